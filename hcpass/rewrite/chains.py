"""Rewrite each residual chain of a graph into n-stream mixer ops.

Input: a graph (normalised by `sites.normalize_inplace`), its `SiteAnalysis`, and a
`MixerSlot` per site. Output: the same graph, rewritten in place, plus the placeholders it
gained for mixer parameters (`RewriteResult`).

Per chain (stream-major ``X[n, *x.shape]``, docs/math.md):
- the chain input x becomes ``X = x.unsqueeze(0).expand(n, ...)`` (n copies); a chain that
  starts at a graph input takes X as an extra input instead, and a graph that returns a
  chain's last value also returns its X (the hand-off across graph breaks,
  `hcpass.runtime.handoff`);
- per site ``s + alpha*y`` with branch read r:
  ``h_pre, h_post, h_res = hcpass.coeffs(R, ...)``, the branch reads ``u = hcpass.pre(R, h_pre)``
  instead of r, and the add becomes ``hcpass.post_res(S, alpha*y, h_post, h_res)``, with S
  and y cast to the add's result dtype where it differs from theirs (type promotion);
- a lifted per-position op g becomes ``g(X.flatten(0, 1)).unflatten(0, (n, -1))``, a lifted
  dropout ``X * dropout(ones_like(x))`` (one mask for every stream);
- anything else that reads a stream value (the chain's consumers, a list of hidden states)
  reads the collapsed stream ``X.mean(0)``.
Branch nodes shared by two sites (the norm of a parallel block) are copied so each site's
branch reads its own ``u``. Nodes made for a site belong to the activation-checkpoint region
of its add (`hcpass.frontend.regions`); the regions are closed again at the end.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

import hcpass.ops  # noqa: F401  (registers torch.ops.hcpass)
from hcpass.frontend.regions import region_of
from hcpass.frontend.sites import Chain, Site, SiteAnalysis
from hcpass.patterns.node_sets import is_dropout
from hcpass.rewrite.base import (
    BranchRewirer,
    Cursor,
    MixerInputs,
    MixerSlot,
    RewriteResult,
    add_placeholders,
    last_placeholder,
)
from hcpass.rewrite.base import dtype as _dtype
from hcpass.rewrite.base import rank as _rank
from hcpass.rewrite.regions import outline_checkpoints

# node.meta key of a coeffs node: (shape, dtype) of the stream state it reads, so a lowering
# can tell which sites' coefficient computations are the same function of the same inputs.
# Absent where the state is a channels-last view of an NCHW stream (its layout is Inductor's
# choice, which a shared subgraph cannot follow).
COEFFS_STATE = "hcpass_coeffs_state"
# node.meta key of a post_res node: (shape, dtype) of the stream state it writes (its x and y
# are cast to that dtype); absent on the same channels-last sites.
MERGE_STATE = "hcpass_merge_state"


def rewrite_chains(
    graph: fx.Graph,
    analysis: SiteAnalysis,
    slot_of: dict[Site, MixerSlot],
) -> RewriteResult:
    """Rewrite `graph` in place. Chains cross the graph's boundary with their n streams
    (hcpass.runtime.handoff): see `RewriteResult.stream_inputs`/`stream_outputs`."""
    return _Rewriter(graph, analysis, slot_of).run()


class _Rewriter:
    def __init__(
        self,
        graph: fx.Graph,
        analysis: SiteAnalysis,
        slot_of: dict[Site, MixerSlot],
    ) -> None:
        self.graph = graph
        self.analysis = analysis
        self.slot_of = slot_of
        self.stream_inputs: list[tuple[fx.Node, fx.Node, Site]] = []
        # n-stream node, its collapse, the chain's last site
        self.stream_outputs: list[tuple[fx.Node, fx.Node, Site]] = []
        self.mixer_inputs: dict[str, MixerInputs] = {}
        self.branches = BranchRewirer(graph)
        self.coefficients: dict[Site, tuple[fx.Node, fx.Node]] = {}  # h_post, h_res
        self.branch_out: dict[Site, fx.Node] = {}

    def run(self) -> RewriteResult:
        self.mixer_inputs = add_placeholders(self.graph, self.analysis.sites, self.slot_of)
        for chain in self.analysis.chains:
            self._chain(chain)
        returned = self._return_states()
        bodies = outline_checkpoints(self.graph)
        self.graph.lint()
        return RewriteResult(
            list(self.mixer_inputs.values()),
            len(self.analysis.sites),
            bodies,
            self.stream_inputs,
            returned,
        )

    def _return_states(self) -> list[tuple[int, Site]]:
        """Append the n-stream states of returned chain ends to the graph's outputs."""
        if not self.stream_outputs:
            return []
        output = self.graph.output_node()
        values = output.args[0]
        output.args = ((*values, *(multi for multi, _, _ in self.stream_outputs)),)
        return [(values.index(collapsed), site) for _, collapsed, site in self.stream_outputs]

    def _mixer(self, site: Site) -> MixerInputs:
        return self.mixer_inputs[self.slot_of[site].key]

    def _chain(self, chain: Chain) -> None:
        counts = {self.slot_of[s].streams for s in chain.sites}
        if len(counts) != 1:
            raise ValueError(f"one chain mixes stream counts {sorted(counts)}")
        streams = counts.pop()
        site_of = {s.node: s for s in chain.sites}
        lifted = set(chain.stream_ops)
        multi: dict[fx.Node, fx.Node] = {}  # stream value -> its n-stream node

        if chain.input.op == "placeholder":
            # The caller passes the n-stream state: kept from an earlier graph, or n copies.
            with self.graph.inserting_after(last_placeholder(self.graph)):
                state = self.graph.placeholder(f"{chain.input.name}_streams")
            self.stream_inputs.append((chain.input, state, chain.sites[0]))
            multi[chain.input] = state
        else:
            cursor = Cursor(self.graph, chain.input, region_of(chain.input))
            copies = cursor.call("call_method", "unsqueeze", (chain.input, 0))
            rank = _rank(chain.input)
            multi[chain.input] = cursor.call(
                "call_method", "expand", (copies, streams, *[-1] * rank)
            )

        readers: dict[fx.Node, list[Site]] = {}
        for site in chain.sites:
            readers.setdefault(site.read, []).append(site)
        for value in chain.stream_values:
            if value in lifted:
                multi[value] = self._lift(value, multi[value.args[0]], streams)
            elif value in site_of:
                multi[value] = self._post_res(site_of[value], multi)
            cursor = Cursor(self.graph, multi[value])
            for site in readers.get(value, []):
                cursor.region = region_of(site.node)
                self._pre(cursor, site, multi[value])

        collapsed = self._collapse_side_readers(chain, multi, site_of, lifted)
        last = chain.stream_values[-1]
        if last in collapsed:
            if self.graph.output_node() in collapsed[last].users:
                self.stream_outputs.append((multi[last], collapsed[last], chain.sites[-1]))
        for value in reversed(chain.stream_values):
            if value is not chain.input:
                self.graph.erase_node(value)

    def _pre(self, cursor: Cursor, site: Site, stream: fx.Node) -> None:
        """coeffs + pre from the read state; the branch reads the result instead of r."""
        mixer = self._mixer(site)
        moved = site.channel_dim != _rank(site.read) - 1
        x = (
            cursor.call("call_method", "movedim", (stream, site.channel_dim + 1, -1))
            if moved
            else stream
        )
        params = mixer.placeholders if mixer.slot.dynamic else (None, None, *mixer.placeholders)
        coeffs = cursor.call(
            "call_function", torch.ops.hcpass.coeffs.default, (x, *params, mixer.slot.spec)
        )
        if not moved:
            read = site.read.meta["example_value"]
            coeffs.meta[COEFFS_STATE] = ((mixer.slot.streams, *read.shape), read.dtype)
        h_pre, h_post, h_res = (
            cursor.call("call_function", operator.getitem, (coeffs, i)) for i in range(3)
        )
        u = cursor.call("call_function", torch.ops.hcpass.pre.default, (x, h_pre))
        if moved:
            u = _channels_back(cursor, u, -1, site.channel_dim)
        self.coefficients[site] = (h_post, h_res)

        env = self.branches.rewire(site, u)
        self.branch_out[site] = env[site.branch]

    def _post_res(self, site: Site, multi: dict[fx.Node, fx.Node]) -> fx.Node:
        h_post, h_res = self.coefficients.pop(site)
        y = self.branch_out.pop(site)
        cursor = Cursor(self.graph, site.node, region_of(site.node))
        # The add's result dtype is the promotion of its operands' (fp32 stream + bf16 branch
        # under autocast -> fp32); the mixer ops take one dtype, so both are cast to it.
        dtype = _dtype(site.node)
        x = multi[site.stream]
        if _dtype(site.stream) != dtype:
            x = cursor.call("call_method", "to", (x, dtype))
        if _dtype(site.branch) != dtype:
            y = cursor.call("call_method", "to", (y, dtype))
        if site.alpha != 1.0:
            y = cursor.call("call_function", operator.mul, (y, site.alpha))
        moved = site.channel_dim != _rank(site.node) - 1
        if moved:
            x = cursor.call("call_method", "movedim", (x, site.channel_dim + 1, -1))
            y = cursor.call("call_method", "movedim", (y, site.channel_dim, -1))
        out = cursor.call("call_function", torch.ops.hcpass.post_res.default, (x, y, h_post, h_res))
        if not moved:
            written = site.node.meta["example_value"]
            out.meta[MERGE_STATE] = ((self._mixer(site).slot.streams, *written.shape), dtype)
        if moved:
            out = _channels_back(cursor, out, -1, site.channel_dim + 1)
        return out

    def _lift(self, op: fx.Node, stream: fx.Node, streams: int) -> fx.Node:
        cursor = Cursor(self.graph, op, region_of(op))
        # In-place variants would write into a stream tensor other nodes still read.
        kwargs = {**op.kwargs, "inplace": False} if "inplace" in op.kwargs else dict(op.kwargs)
        target = op.target.rstrip("_") if op.op == "call_method" else op.target
        if is_dropout(op) and _drops(op):
            # One mask for every stream, drawn as the original draws its own (one stream's
            # shape: the same random numbers), so the streams' mean is dropped exactly as the
            # original stream is; a mask per stream would average n masks (less noise).
            one_stream = cursor.call("call_method", "select", (stream, 0, 0))
            ones = cursor.call("call_function", torch.ones_like, (one_stream,))
            mask = cursor.call(op.op, target, (ones, *op.args[1:]), kwargs)
            return cursor.call("call_function", operator.mul, (stream, mask))
        folded = cursor.call("call_method", "flatten", (stream, 0, 1))
        applied = cursor.call(op.op, target, (folded, *op.args[1:]), kwargs)
        return cursor.call("call_method", "unflatten", (applied, 0, (streams, -1)))

    def _collapse_side_readers(self, chain: Chain, multi, site_of, lifted) -> dict:
        """Readers of a stream value other than the chain itself get the mean of the streams.
        Returns the mean node of each stream value that has such readers."""
        means: dict[fx.Node, fx.Node] = {}
        for value in chain.stream_values:
            if value is chain.input:
                continue  # its other readers already read the single stream
            collapsed = None
            for user in list(value.users):
                if user in site_of and site_of[user].stream is value:
                    continue
                if user in lifted and user.args[0] is value:
                    continue
                if collapsed is None:
                    cursor = Cursor(self.graph, multi[value], region_of(value))
                    collapsed = cursor.call("call_method", "mean", (multi[value], 0))
                    means[value] = collapsed
                user.replace_input_with(value, collapsed)
        return means


def _channels_back(cursor: Cursor, value: fx.Node, source: int, channel_dim: int) -> fx.Node:
    """Move the channels of an op's channels-last output back to `channel_dim`, in the
    original (contiguous, e.g. NCHW) layout. A bare movedim would hand the model's convs a
    channels-last view whose strides, once Inductor makes the sizes symbolic, cannot tell
    channels-last from contiguous where a spatial size may be 1 (the conv lowering then
    fails: "cannot determine truth value of Relational"). Under Inductor the copy fuses into
    the op's own kernel."""
    moved = cursor.call("call_method", "movedim", (value, source, channel_dim))
    return cursor.call("call_method", "contiguous", (moved,))


def _drops(dropout: fx.Node) -> bool:
    """Whether a dropout call may zero anything: not with a literal ``p == 0`` or
    ``training=False`` (a module in eval mode, which Dynamo records as a constant)."""
    p = dropout.args[1] if len(dropout.args) > 1 else dropout.kwargs.get("p", 0.5)
    training = dropout.args[2] if len(dropout.args) > 2 else None
    if training is None:
        training = dropout.kwargs.get("training", dropout.kwargs.get("train", True))
    return not (p == 0 or training is False)
