"""Which residual chains can become Attention Residuals, and why the others cannot.

Attention Residuals (docs/math.md) feed each branch, and the chain's consumers, a softmax-
weighted combination of the chain's values instead of their sum. At init the weights are
uniform, so a reader gets ``x / k`` where it got ``x``: the rewrite preserves the model's
function only where every such reader is a scale-invariant norm (a pre-norm block, and a
final norm after the chain), whose epsilon it then divides by ``k^2``. Chains that are not
like that are skipped with the reason, in `hcpass.explain` and in the runtime's checks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from hcpass.frontend.sites import Chain, Site, SiteAnalysis, Skipped
from hcpass.patterns.node_sets import target_name
from hcpass.patterns.result import Match, Skip
from hcpass.patterns.scale_invariant_norm import ScaleInvariantNorm, norms_reading


@dataclass(frozen=True)
class ChainNorms:
    """The norms that make a chain convertible: each site's branch starts with `branch`
    norms of its stream value; the chain's last value is read only by the `output` norms."""

    branch: dict[Site, list[ScaleInvariantNorm]]
    output: list[ScaleInvariantNorm]


def chain_norms(chain: Chain) -> Match[ChainNorms] | Skip:
    """The chain's norms, or why it cannot become Attention Residuals."""
    if chain.stream_ops:
        op = chain.stream_ops[0]
        return Skip(
            f"the stream passes through {target_name(op)} between sites (a post-norm or "
            "post-activation block): Attention Residuals need a pre-norm chain"
        )
    dtypes = {_value(s.node).dtype for s in chain.sites}
    if len(dtypes) > 1:
        return Skip(f"the chain's adds have several dtypes ({sorted(map(str, dtypes))})")
    branch: dict[Site, list[ScaleInvariantNorm]] = {}
    for site in chain.sites:
        if site.channel_dim != _value(site.node).dim() - 1:
            return Skip(
                "its channels are not the last dimension (a convolutional stream): the "
                "depth attention normalises over the last dimension"
            )
        readers = [u for u in site.read.users if u in site.branch_nodes]
        found = norms_reading(site.read, readers)
        if isinstance(found, Skip):
            return Skip(
                f"the branch of {site.node.name} starts with {found.reason}: Attention "
                "Residuals need a pre-norm block (its norm makes the branch blind to the "
                "scale of its input)"
            )
        branch[site] = found.value
    last = chain.stream_values[-1]
    output = norms_reading(last, list(last.users))
    if isinstance(output, Skip):
        return Skip(
            f"the chain's output is read by {output.reason}: the final depth attention, a "
            "mean of the values at init, would change what it reads"
        )
    return Match(ChainNorms(branch, output.value))


def keep_convertible(analysis: SiteAnalysis) -> None:
    """Move the chains that cannot become Attention Residuals to `analysis.skipped`."""
    kept = []
    for chain in analysis.chains:
        found = chain_norms(chain)
        if isinstance(found, Skip):
            reason = f"not converted to Attention Residuals: {found.reason}"
            analysis.skipped.extend(Skipped(site.node, reason) for site in chain.sites)
        else:
            kept.append(chain)
    analysis.chains[:] = kept


def _value(node: fx.Node):
    return node.meta["example_value"]
