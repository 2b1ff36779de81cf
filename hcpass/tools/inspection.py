"""Look inside a converted model: the coefficients its mixers use, the composite gain
of H_res over depth (mHC's "Amax Gain Magnitude"), for Attention Residuals the attention
weights over depth, and, for a plain or converted model, the magnitudes and gradients over
depth (`depth_profile`: the PreNorm-dilution picture)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from hcpass.frontend.capture import (
    CapturedGraph,
    capture,
    capture_and_run,
    parameter_name,
    side_effect_free,
    unwrapped_parameters,
)
from hcpass.frontend.plan import WHAT_IS_A_SITE, analyse, plan
from hcpass.frontend.sites import Site
from hcpass.ops.attnres import reference as attnres_reference
from hcpass.rewrite.attnres import AttnResOptions
from hcpass.runtime.mixer import Mixer
from hcpass.runtime.module import ConvertedModule
from hcpass.text import unique_name


def _stream_cosine(x: Tensor) -> Tensor:
    """Mean cosine similarity over the pairs of streams of ``x [n, *pos, C]``, per position
    (1 for n = 1: one stream is its own copy)."""
    n = x.shape[0]
    if n == 1:
        return x.new_ones(x.shape[1:-1], dtype=torch.float32)
    unit = torch.nn.functional.normalize(x.detach().float(), dim=-1)
    gram = torch.einsum("i...c,j...c->...ij", unit, unit)
    return (gram.sum((-2, -1)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


class _CoefficientRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.hcpass.coeffs.default:
            x, bias = args[0], args[3]
            record = dict(
                zip(("h_pre", "h_post", "h_res"), (t.detach().clone() for t in out), strict=True)
            )
            record["stream_cosine"] = _stream_cosine(x)
            self.calls.append((bias.data_ptr(), record))
        return out


def mixers(
    model: ConvertedModule,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Per site, in forward order: the ``h_pre [*pos, n]``, ``h_post [*pos, n]`` and
    ``h_res [*pos, n, n]`` used in one forward pass on the example inputs, and
    ``stream_cosine [*pos]``, the mean cosine similarity between pairs of the site's input
    streams (1 at init, where they are copies; how far below 1 says how much the streams
    have diverged). A site that runs twice (a weight-shared block) appears as ``name``,
    ``name#2``."""
    if not isinstance(model, ConvertedModule):
        raise TypeError("hcpass.mixers needs a model returned by hcpass.convert")
    if not all(isinstance(module, Mixer) for module in model.mixers.values()):
        raise TypeError(
            f"hcpass.mixers and hcpass.gain report hyper-connection mixers; this model was "
            f"converted with family={model.family.name!r}, whose sites have no H matrices: "
            f"use hcpass.depth_weights for the attention over depth"
        )
    key_of = {mixer.bias.data_ptr(): key for key, mixer in model.mixers.items()}
    recorder = _CoefficientRecorder()
    with side_effect_free(model):
        model.observed_forward(recorder, *tuple(example_inputs), **(example_kwargs or {}))
    result: dict[str, dict[str, Tensor]] = {}
    for pointer, record in recorder.calls:
        result[unique_name(key_of[pointer], result, separator="#")] = record
    return result


def gain(
    model: ConvertedModule,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Amax gain of the composite ``P = H_res[d] @ ... @ H_res[1]`` after each depth d.

    forward gain = max_i sum_j |P_ij| (max absolute row sum), backward gain = max_j
    sum_i |P_ij| (max absolute column sum), each averaged over positions. The product
    restarts where the positions change (a new chain: after a projection shortcut)."""
    rows = []
    product: Tensor | None = None
    for depth, coefficients in enumerate(mixers(model, example_inputs, example_kwargs).values(), 1):
        h_res = coefficients["h_res"].double()
        if product is None or product.shape != h_res.shape:
            product = torch.eye(h_res.shape[-1], dtype=h_res.dtype).expand_as(h_res)
        product = h_res @ product
        rows.append(
            {
                "depth": depth,
                "forward": product.abs().sum(-1).amax(-1).mean().item(),
                "backward": product.abs().sum(-2).amax(-1).mean().item(),
            }
        )
    return rows


# ------------------------------------------------------------------ Attention Residuals
@dataclass(frozen=True)
class DepthWeights:
    """What one site (or a chain's output) read: ``weights [*pos, k]``, its softmax over the
    chain's k values (summing to 1 over the last dim), and the k `sources` those values are
    (``"input"``, then a site key per site in full Attention Residuals, ``"block j"`` in
    Block AttnRes, where the last is the current, partial block). `chain` is the key of the
    chain's first site (a model may have several chains)."""

    weights: Tensor
    sources: tuple[str, ...]
    chain: str


class _WeightRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, Tensor]] = []  # (the query's data pointer, weights)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.hcpass.attnres.default:
            values, query, eps = args
            alpha = attnres_reference.weights(values, query, eps).movedim(0, -1)
            self.calls.append((query.data_ptr(), alpha.detach()))
        return out


def depth_weights(
    model: ConvertedModule,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
) -> dict[str, DepthWeights]:
    """Per site of a model converted with ``family="attnres"``, in forward order: the
    attention weights over depth its branch used in one forward pass on the example inputs
    (`DepthWeights`), and after a chain's last site its output's (the final norm's input),
    keyed ``"<last site>:output"``.

    A chain's first site reads the chain's input alone: its weights are ones ``[*pos, 1]``.
    At init (zero queries) every site reads the mean of its k values: weights ``1 / k``. A
    site that runs twice (a weight-shared block) appears as ``name``, ``name#2``."""
    if not isinstance(model, ConvertedModule) or not isinstance(
        model.family_options, AttnResOptions
    ):
        raise TypeError(
            "hcpass.depth_weights needs a model returned by hcpass.convert(..., family='attnres')"
        )
    chains = _chains(model)
    # Each op call names its site by the query it reads (the output query: the chain's end).
    read_by: dict[int, tuple[str, bool]] = {}
    for key, module in model.mixers.items():
        if module.query is not None:
            read_by[module.query.data_ptr()] = (key, False)
        if module.output_query is not None:
            read_by[module.output_query.data_ptr()] = (key, True)
    recorder = _WeightRecorder()
    with side_effect_free(model):
        model.observed_forward(recorder, *tuple(example_inputs), **(example_kwargs or {}))
    block_size = model.family_options.block_size
    result: dict[str, DepthWeights] = {}

    def add(name: str, weights: Tensor, chain: list[str]) -> None:
        sources = _sources(chain, weights.shape[-1], block_size)
        result[unique_name(name, result, separator="#")] = DepthWeights(weights, sources, chain[0])

    for pointer, weights in recorder.calls:
        key, output = read_by[pointer]
        chain = chains[key]
        # The op's first read of a chain comes right after the chain's first site, which ran
        # no op: that site read x_0 alone, with weight 1.
        if (output and len(chain) == 1) or (not output and chain.index(key) == 1):
            add(chain[0], weights.new_ones(*weights.shape[:-1], 1), chain)
        add(f"{key}:output" if output else key, weights, chain)
    return result


def _chains(model: ConvertedModule) -> dict[str, list[str]]:
    """Each site's chain, as the keys of its sites in order (from the plan's `follows`)."""
    after = {model.follows(key): key for key in model.mixers if model.follows(key) is not None}
    chains: dict[str, list[str]] = {}
    for key in model.mixers:
        if model.follows(key) is None:
            chain = [key]
            # (stops at a repeat: a cycle would mean a key that runs twice in one chain)
            while chain[-1] in after and after[chain[-1]] not in chain:
                chain.append(after[chain[-1]])
            for member in chain:
                chains[member] = chain
    return chains


def _sources(chain: list[str], k: int, block_size: int | None) -> tuple[str, ...]:
    """Labels of a chain's first k values: source 0 is the chain's input, source j the j-th
    block (full Attention Residuals: the j-th site's output, named by the site's key)."""
    if (block_size or 1) == 1:
        return ("input", *chain[: k - 1])
    return ("input", *(f"block {j}" for j in range(1, k)))


# ------------------------------------------------------------------- depth profile
PLAIN = "plain"


@dataclass(frozen=True)
class SiteProfile:
    """One residual site's magnitudes in one forward pass, and its branch's gradient.

    Every RMS is ``sqrt(mean(t ** 2))`` over all of a tensor's elements (every position and
    channel), in fp64; a non-finite value comes out NaN or inf, never dropped."""

    site: str  # its key, as in `hcpass.mixers` (``name#2``: a weight-shared block's 2nd run)
    chain: str  # the key of its chain's first site
    depth: int  # 1, 2, ...: its place in the forward order over the whole model
    read_rms: float  # what its branch reads (the input of the branch's norm)
    output_rms: float  # y = alpha * branch: what the site adds
    stream_rms: float  # the residual stream after the site
    grad_norm: float | None  # the loss's gradient over the branch's parameters (None: no loss)


@dataclass(frozen=True)
class DepthProfile:
    """What `depth_profile` measured: a `SiteProfile` per site run, in forward order."""

    family: str  # "plain", "hyper-connections" or "attnres"
    sites: tuple[SiteProfile, ...]
    loss: float | None  # the loss whose gradient `grad_norm` is (None: none was given)

    def column(self, name: str) -> list[Any]:
        """One field over depth: ``profile.column("stream_rms")``."""
        return [getattr(site, name) for site in self.sites]


def depth_profile(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    loss_fn: Callable[[Any], Tensor] | None = None,
) -> DepthProfile:
    """Per residual site of a plain or converted model, in forward order, on one forward
    (and backward) pass: the RMS of what the branch reads, of what it adds, of the residual
    stream after it, and the norm of the loss's gradient over the branch's parameters (the
    picture of PreNorm dilution: a plain pre-norm stream grows with depth and each block's
    output becomes a smaller part of it).

    The sites are found in the plain model (`model.original` for a converted one) as
    `hcpass.explain` finds them, and measured alike in both, so that a model converted with a
    function-preserving init gives the plain model's numbers at init:

    - ``output_rms``: ``y = alpha * branch``, the tensor the site adds (hyper-connections:
      the `y` the mixer's ``post_res`` gets; Attention Residuals: the site's value).
    - ``stream_rms``: plain, the add's result; hyper-connections, the mean of the n streams
      (what a reader outside the chain gets); Attention Residuals, which keeps the values
      instead of their sum, ``x_0 + y_1 + ... + y_l``, the sum a plain chain would carry.
    - ``read_rms``: plain, the stream value the branch reads; hyper-connections, the
      ``H_pre`` mix of the streams; Attention Residuals, the softmax over depth (a
      convex combination of the values, ``x_{l-1} / k`` of k values at init, where the
      norm's epsilon is divided by ``k^2``: the branch computes the same).
    - ``grad_norm``: the L2 norm over the trainable parameters the branch computes with
      (the parameters are the model's own, shared by plain and converted; the mixers are
      not counted), of the gradient of ``loss_fn(output)``, or of ``output.loss`` (HF
      models given labels) without `loss_fn`; None without either. Gradients are computed
      with `torch.autograd.grad`: the parameters' ``.grad`` are not touched.

    Runs eagerly (Dynamo capture, no Inductor); buffers and the RNG state are restored.
    ``ValueError`` for a model without residual sites."""
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    if isinstance(model, ConvertedModule):
        original = model.original
        with side_effect_free(original):
            graphs = capture(original, args, kwargs)
        runs, output = _run_converted(model, args, kwargs)
        chain_of = {key: chain[0] for key, chain in _chains(model).items()}
        family = model.family.name
    else:
        original = model
        graphs, runs, output = _run_plain(model, args, kwargs)
        family = PLAIN
    found = plan(original, graphs)
    if not found.planned:
        raise ValueError(
            f"hcpass.depth_profile found no residual sites in {type(original).__name__}: "
            f"{WHAT_IS_A_SITE}. `hcpass.explain(model, example_inputs)` lists the adds it saw "
            "and why each is not a site"
        )
    key_of = {site.anchor: site.key for site in found.planned}
    if not isinstance(model, ConvertedModule):
        first = {site.key: site.follows for site in found.planned}
        chain_of = {key: _first_of(key, first) for key in first}
        for run in runs:
            run.key = key_of[run.key]
    elif unplanned := sorted({run.key for run in runs} - set(key_of.values())):
        # Their branches' parameters would be unknown: no gradient norm to give.
        raise ValueError(
            f"hcpass.depth_profile: at these inputs the original model has no site for the "
            f"converted model's mixer(s) {', '.join(unplanned)}; profile it with inputs like "
            "those it was converted with"
        )
    loss = _loss(output, loss_fn)
    grads = _branch_gradients(original, graphs, key_of, loss)
    sites: list[SiteProfile] = []
    taken: dict[str, None] = {}
    for depth, run in enumerate(runs, 1):
        name = unique_name(run.key, taken, separator="#")
        taken[name] = None
        grad = grads.get(run.key) if loss is not None else None
        sites.append(
            SiteProfile(
                name, chain_of[run.key], depth, run.read_rms, run.output_rms, run.stream_rms, grad
            )
        )
    return DepthProfile(family, tuple(sites), None if loss is None else loss.item())


def _first_of(key: str, follows: dict[str, str | None]) -> str:
    while (before := follows[key]) is not None and before != key:
        key = before
    return key


def _rms(t: Tensor) -> float:
    return t.detach().double().square().mean().sqrt().item()


@dataclass
class _SiteRun:
    """What one run of a site measured (`key`: the plain model's anchor parameter until
    the plan names it)."""

    key: str
    read_rms: float = math.nan
    output_rms: float = math.nan
    stream_rms: float = math.nan


def _loss(output: Any, loss_fn: Callable[[Any], Tensor] | None) -> Tensor | None:
    loss = loss_fn(output) if loss_fn is not None else getattr(output, "loss", None)
    if loss is None:
        return None
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("hcpass.depth_profile: loss_fn must return a tensor with one element")
    return loss


def _branch_gradients(
    model: nn.Module, graphs: Sequence[CapturedGraph], key_of: dict[str, str], loss: Tensor | None
) -> dict[str, float]:
    """Each site's (key's) gradient norm over its branch's trainable parameters."""
    if loss is None:
        return {}
    used: dict[str, set[str]] = {}
    for captured in graphs:
        _, analysis = analyse(captured.gm)
        for site in analysis.sites:
            if site.anchor_name in key_of:
                used.setdefault(key_of[site.anchor_name], set()).update(_branch_parameters(site))
    parameters = dict(unwrapped_parameters(model))
    names = sorted({n for names in used.values() for n in names if parameters[n].requires_grad})
    grads = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
    square = {
        name: 0.0 if grad is None else grad.detach().double().square().sum().item()
        for name, grad in zip(names, grads, strict=True)
    }
    return {
        key: math.sqrt(sum(square[n] for n in names_used if n in square))
        for key, names_used in used.items()
    }


def _branch_parameters(site: Site) -> set[str]:
    """The parameters a branch computes with: parameter placeholders read by its nodes,
    directly or through ops on parameters alone (a transposed or tied weight)."""
    found: set[str] = set()
    seen: set[fx.Node] = set()
    stack = list(site.branch_nodes)
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent in seen or parent in site.branch_nodes:
                continue
            seen.add(parent)
            name = parameter_name(parent)
            if name is not None:
                found.add(name)
            elif parent.op != "placeholder" and _reads_parameters_only(parent):
                stack.append(parent)
    return found


def _reads_parameters_only(node: fx.Node) -> bool:
    """Every placeholder `node` depends on is a parameter (it is a function of weights)."""
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        for parent in current.all_input_nodes:
            if parent in seen:
                continue
            seen.add(parent)
            if parent.op == "placeholder" and parameter_name(parent) is None:
                return False
            pending.append(parent)
    return True


# The plain model: its captured graphs run through an interpreter that measures each site.
class _PlainSites(fx.Interpreter):
    """Runs one captured graph, measuring each residual site at its add, and each stream
    value a branch reads when it is computed (an in-place ``x += y`` writes over it later,
    and the interpreter frees it after its last reader)."""

    def __init__(self, gm: fx.GraphModule, sites: Sequence[Site], runs: list[_SiteRun]) -> None:
        super().__init__(gm)
        by_name = {node.name: node for node in gm.graph.nodes}
        self.sites: dict[fx.Node, tuple[fx.Node, fx.Node, Site]] = {}
        for site in sites:
            nodes = [by_name.get(n.name) for n in (site.node, site.branch, site.read)]
            if None in nodes:  # the front end inlined it from an activation checkpoint
                raise NotImplementedError(
                    f"hcpass.depth_profile: site {site.anchor_name} lies inside an activation "
                    "checkpoint region of the plain model; profile it with checkpointing off"
                )
            self.sites[nodes[0]] = (nodes[1], nodes[2], site)
        self.read_rms: dict[fx.Node, float] = dict.fromkeys(
            read for _, read, _ in self.sites.values()
        )
        self.runs = runs

    def run_node(self, n: fx.Node) -> Any:
        if n not in self.sites:
            out = super().run_node(n)
            if n in self.read_rms:
                self.read_rms[n] = _rms(out)
            return out
        branch, read, site = self.sites[n]
        run = _SiteRun(site.anchor_name, self.read_rms[read], _rms(site.alpha * self.env[branch]))
        out = super().run_node(n)
        run.stream_rms = _rms(out)
        if n in self.read_rms:  # the next site reads it
            self.read_rms[n] = run.stream_rms
        self.runs.append(run)
        return out


def _run_plain(
    model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[list[CapturedGraph], list[_SiteRun], Any]:
    """Capture `model` as `convert` does, each graph call run through `_PlainSites` with its
    sites found in the call's graph (parameters named)."""
    runs: list[_SiteRun] = []

    def measured(captured: CapturedGraph, gm: fx.GraphModule, call_args: tuple[Any, ...]) -> Any:
        _, analysis = analyse(captured.gm)
        return _PlainSites(gm, analysis.sites, runs).run(*call_args)

    graphs, output = capture_and_run(model, args, kwargs, measured)
    return graphs, runs, output


# A converted model: its mixer ops, seen where the rewritten graphs run them.
class _ConvertedSites(TorchDispatchMode):
    """Measures each site from the ops of its family: hyper-connections ``coeffs`` (which
    site: its bias), ``pre`` (the read) and ``post_res`` (y and the streams after it);
    Attention Residuals ``attnres`` (which site: its query), whose values are the chain's
    input, its completed blocks and the current partial block."""

    def __init__(self, model: ConvertedModule) -> None:
        super().__init__()
        self.runs: list[_SiteRun] = []
        self.pending: dict[int, _SiteRun] = {}  # h_pre / h_post data pointer -> its site run
        self.bias_key = {
            module.bias.data_ptr(): key
            for key, module in model.mixers.items()
            if getattr(module, "bias", None) is not None
        }
        self.options = model.family_options
        self.chains = _chains(model)
        self.read_by: dict[int, tuple[str, bool]] = {}  # query pointer -> (site, output?)
        for key, module in model.mixers.items():
            for name, output in (("query", False), ("output_query", True)):
                query = getattr(module, name, None)
                if query is not None:
                    self.read_by[query.data_ptr()] = (key, output)
        self.open: dict[str, _SiteRun] = {}  # chain -> its site run waiting for its y
        self.partial: dict[str, Tensor] = {}  # chain -> the partial block after that site

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.hcpass.coeffs.default:
            run = _SiteRun(self.bias_key[args[3].data_ptr()])
            self.pending[out[0].data_ptr()] = self.pending[out[1].data_ptr()] = run
        elif func is torch.ops.hcpass.pre.default:
            self.pending.pop(args[1].data_ptr()).read_rms = _rms(out)
        elif func is torch.ops.hcpass.post_res.default:
            run = self.pending.pop(args[2].data_ptr())
            run.output_rms, run.stream_rms = _rms(args[1]), _rms(out.mean(0))
            self.runs.append(run)
        elif func is torch.ops.hcpass.attnres.default:
            self._attnres(args[0], args[1], out)
        return out

    def _attnres(self, values: list[Tensor], query: Tensor, read: Tensor) -> None:
        """A call at site m of a chain (or at its output) closes site m - 1: the last value
        is its partial block, y the partial's growth since site m - 2 (in a new block: all
        of it), and the values sum to the stream a plain chain would carry."""
        key, output = self.read_by[query.data_ptr()]
        chain = self.chains[key]
        start = chain[0]
        closed = len(chain) - 1 if output else chain.index(key) - 1
        run = self.open.pop(start, None) or _SiteRun(chain[0], _rms(values[0]))
        partial = values[-1].detach()
        block_size = self.options.block_size or 1  # attnres ops: an AttnResOptions
        y = partial if closed % block_size == 0 else partial - self.partial[start]
        self.partial[start] = partial
        run.output_rms, run.stream_rms = _rms(y), _rms(torch.stack(list(values)).sum(0))
        self.runs.append(run)
        if not output:
            self.open[start] = _SiteRun(key, _rms(read))


def _run_converted(
    model: ConvertedModule, args: tuple, kwargs: dict[str, Any]
) -> tuple[list[_SiteRun], Any]:
    observer = _ConvertedSites(model)
    with side_effect_free(model):
        output = model.observed_forward(observer, *args, **kwargs)
    return observer.runs, output
