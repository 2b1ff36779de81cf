"""hcpass in PyTorch's logging system: ``TORCH_LOGS="+hcpass"``.

Everything hcpass logs goes to ``logging.getLogger("hcpass")`` and its children. `register`
names that logger as the ``hcpass`` component of `torch._logging`, so
``torch._logging.set_logs(modules={"hcpass": logging.DEBUG})`` works and the component is
reset and given torch's handler and format like ``dynamo`` or ``inductor``.

``TORCH_LOGS`` itself is parsed once, inside ``import torch`` -- before hcpass can register
anything. ``TORCH_LOGS="+hcpass"`` works anyway because torch accepts any importable module
name there (it imports the package and enables its loggers). For the same reason hcpass
registers no `torch._logging` *artifact*: an artifact name that is not registered yet when
torch parses ``TORCH_LOGS`` makes ``import torch`` raise.

Levels: INFO says which sites a graph was rewritten with (``TORCH_LOGS="hcpass"``);
DEBUG adds the rewritten graph's code (``TORCH_LOGS="+hcpass"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import fx

LOGGER = "hcpass"

log = logging.getLogger(LOGGER)


def register() -> None:
    """Make ``hcpass`` a `torch._logging` component (idempotent; called on ``import hcpass``)."""
    from torch._logging import _internal

    if not _internal.log_registry.is_log(LOGGER):
        _internal.register_log(LOGGER, LOGGER)


def rewritten_graph(gm: fx.GraphModule, mixers: Sequence[str], site_count: int, where: str) -> None:
    """Log a graph hcpass rewrote: the `mixers` it reads and its `site_count` at INFO, its
    code at DEBUG. `where` names the caller, e.g. ``"hcpass backend"``."""
    if not log.isEnabledFor(logging.INFO):
        return  # print_readable is not free: skip it unless someone listens
    log.info(
        "%s: rewrote a graph: %d site run(s), mixers %s",
        where,
        site_count,
        ", ".join(mixers) or "-",
    )
    if log.isEnabledFor(logging.DEBUG):
        code = gm.print_readable(print_output=False, include_stride=False, colored=False)
        log.debug("%s: rewritten graph\n%s", where, code)
