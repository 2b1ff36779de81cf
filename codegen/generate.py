"""Build, cache and autotune the Triton kernels of the hcpass mixer ops.

How a kernel is specialised, and why two mechanisms:

- The manifold's H_res map is Triton *source* (`Manifold.triton_res_map()`), so the
  coefficient kernels are generated as text: `coeffs_template.py` with that source spliced
  between its EPILOGUE markers, written to ``$HCPASS_CACHE_DIR/codegen/<name>_<hash>.py``
  (default ``~/.cache/hcpass``) and imported from there. Triton needs a real file
  (it reads kernel source with `inspect`), and a file is something a user can open when a
  kernel misbehaves. A manifold option that changes the math (Sinkhorn's iteration count)
  changes the text, hence the hash: one module per distinct epilogue.
- Everything else -- n, C, the dtypes, whether phi is present, fused or raw H_res -- is a
  ``tl.constexpr`` argument or a pointer dtype, which Triton already specialises and caches
  a binary for. Splicing those as text too would only duplicate that cache.

The stream kernels (`streams_template.py`) have no epilogue but are loaded the same way, for
one reason: `@triton.jit` decides between a compiled and an interpreted function (CPU
tensors, for tests) when it runs -- for triton's own library (tl.sum, tl.sigmoid, ...) at
``import triton`` -- and a kernel only works decorated the same way as the library it
calls. Loading every template here, in the mode triton was imported in (`interpreted()`),
keeps them consistent even if TRITON_INTERPRET changed since.

The same reason decides how the templates share ``@triton.jit`` helpers (`jit_helpers.py`,
e.g. the residual merge of post_res_fwd and the site-boundary kernel): not by a run-time
import, which would decorate the helpers once, in whatever mode TRITON_INTERPRET named at
that first import, but by splicing their definitions into every template in place of its
``from .jit_helpers import ...`` (between its SHARED markers). Each generated module is
then complete -- one file to read, one hash over all the source it runs -- and its helpers
are decorated together with its kernels.

Autotuning: each kernel gets a small (BLOCK_P, BLOCK_C, num_warps) space, keyed on (N, C)
and the argument dtypes, the choice kept in Triton's on-disk cache; the interpreter gets one
config, as it has nothing to tune.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

import triton
import triton.language as tl
from triton.runtime import JITFunction

TEMPLATE_DIR = Path(__file__).resolve().parent
# The @triton.jit helpers every template splices in (see the module docstring).
SHARED_HELPERS = TEMPLATE_DIR / "jit_helpers.py"

# Which template defines each kernel.
TEMPLATES = {
    "coeffs_fwd": "coeffs_template",
    "coeffs_bwd_logits": "coeffs_template",
    "coeffs_bwd_x": "coeffs_template",
    "pre_fwd": "streams_template",
    "pre_bwd": "streams_template",
    "post_res_fwd": "streams_template",
    "post_res_bwd": "streams_template",
    "post_res_coeffs_pre_fwd": "coeffs_template",
}

# (BLOCK_P, BLOCK_C, num_warps) the autotuner tries on a GPU. The coefficient kernels feed
# tl.dot, so BLOCK_P and BLOCK_C stay >= 16, and a larger BLOCK_P re-reads phi less often.
# The stream kernels hold an [n, BLOCK_P, BLOCK_C] tile: wide in C for coalesced bf16 rows,
# few positions.
_COEFFS_SPACE = ((16, 128, 4), (32, 64, 4), (32, 64, 8), (64, 64, 8))
_STREAMS_SPACE = ((4, 256, 4), (4, 512, 8), (8, 128, 4), (8, 256, 8))
CONFIG_SPACES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "coeffs_fwd": _COEFFS_SPACE,
    "coeffs_bwd_logits": _COEFFS_SPACE,
    "coeffs_bwd_x": ((32, 64, 4), (32, 64, 8), (64, 64, 8), (32, 128, 8)),
    "pre_fwd": _STREAMS_SPACE,
    "pre_bwd": _STREAMS_SPACE,
    "post_res_fwd": _STREAMS_SPACE,
    "post_res_bwd": ((2, 256, 4), (4, 128, 4), (4, 256, 8), (8, 64, 4)),
    # an [n, BLOCK_P, BLOCK_C] stream tile and [n, BLOCK_C, 16] phi tiles per logit group
    "post_res_coeffs_pre_fwd": ((16, 32, 4), (16, 32, 8), (16, 64, 8), (32, 64, 8)),
}

# The interpreter runs program instances one after another at ~1 ms each: few, large blocks.
INTERPRET_CONFIG = {"BLOCK_P": 16, "BLOCK_C": 64}

# Partial-sum buffers a config writes only part of: zeroed before every benchmarked run.
RESET_TO_ZERO = {"coeffs_bwd_logits": ["dalpha_ptr", "dbias_ptr"]}


def interpreted() -> bool:
    """Whether triton was imported with TRITON_INTERPRET=1 (its library is interpreted)."""
    return not isinstance(tl.sum, JITFunction)


def cache_dir() -> Path:
    root = os.environ.get("HCPASS_CACHE_DIR") or Path.home() / ".cache" / "hcpass"
    return Path(root) / "codegen"


def _replace_block(template_source: str, block: str, text: str) -> str:
    """The template with the lines between its ``# >>> block`` and ``# <<< block`` markers
    replaced by `text`."""
    head, begin, rest = template_source.partition(f"# >>> {block}")
    _, end, tail = rest.partition(f"# <<< {block}")
    if not (begin and end):
        raise ValueError(f"template has no {block} block to splice into")
    return f"{head}{begin} (spliced by hcpass.codegen)\n{text.strip()}\n\n\n{end}{tail}"


def splice(template_source: str, epilogue: str) -> str:
    """The template with the block between the EPILOGUE markers replaced by `epilogue`."""
    return _replace_block(template_source, "EPILOGUE", epilogue)


def shared_helpers() -> str:
    """The definitions of jit_helpers.py: its source from the first one on (its docstring
    and imports stay behind; the templates import triton themselves)."""
    source = SHARED_HELPERS.read_text()
    first = next(node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef))
    start = min([first.lineno] + [decorator.lineno for decorator in first.decorator_list])
    return "".join(source.splitlines(keepends=True)[start - 1 :])


def _write_once(source: str, stem: str) -> Path:
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = cache_dir() / f"{stem}_{digest}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: concurrent processes never import a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".py.tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    return path


@functools.cache
def load_module(template: str, epilogue: str | None) -> ModuleType:
    """Import `template`, with the shared helpers and `epilogue` (if given) spliced in, as
    a kernel module."""
    source = _replace_block(
        (TEMPLATE_DIR / f"{template}.py").read_text(), "SHARED", shared_helpers()
    )
    if epilogue is not None:
        source = splice(source, epilogue)
    header = f"# Generated by hcpass.codegen from {template}.py. Do not edit.\n"
    path = _write_once(header + source, template)
    spec = importlib.util.spec_from_file_location(f"hcpass_codegen_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpreted()
        spec.loader.exec_module(module)
    return module


def configs(name: str) -> list[triton.Config]:
    if interpreted():
        return [triton.Config(dict(INTERPRET_CONFIG), num_warps=1)]
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_C": bc}, num_warps=warps)
        for bp, bc, warps in CONFIG_SPACES[name]
    ]


def min_block_p(name: str) -> int:
    """Smallest BLOCK_P `name` may run with: sizes its per-program partial sums."""
    return min(config.kwargs["BLOCK_P"] for config in configs(name))


@functools.cache
def kernel(name: str, epilogue: str | None) -> triton.runtime.Autotuner:
    """Kernel `name` (a key of TEMPLATES), autotuned on (N, C); `epilogue` is the
    manifold's `triton_res_map()` for the coefficient kernels, None elsewhere."""
    fn = getattr(load_module(TEMPLATES[name], epilogue), name)
    # cache_results: the chosen config persists in Triton's cache, so a new process does not
    # benchmark again (the interpreter never caches).
    return triton.autotune(
        configs=configs(name),
        key=["N", "C"],
        reset_to_zero=RESET_TO_ZERO.get(name),
        cache_results=True,
    )(fn)
