"""Attention Residuals (``family="attnres"``): which chains convert, the rewritten graph,
function preservation at init, training, compilation, and the options' errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch import nn

import hcpass
from tests.graphs import body
from tests.models import ZOO, ParallelBlocks, hf, logits, tiny_gpt

# fp32, relative to the output's max magnitude (issue 13's bound).
PRESERVE_RTOL = 1e-5
# compiled vs eager of the converted model, fp32 (Inductor reorders reductions).
COMPILE_ATOL = 1e-4
ATTNRES = torch.ops.hcpass.attnres.default


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length))


def _attnres_calls(gm: torch.fx.GraphModule) -> list[tuple[int, str]]:
    """(number of values, query) of each depth attention, in graph order, also inside the
    checkpoint bodies that recompute them."""
    calls = []
    for node in gm.graph.nodes:
        if node.target is ATTNRES:
            calls.append((len(node.args[0]), node.args[1].name))
        elif node.op == "get_attr" and isinstance(
            gm.get_submodule(node.target), torch.fx.GraphModule
        ):
            calls += _attnres_calls(gm.get_submodule(node.target))
    return calls


class Residual(nn.Module):
    """``x + fc(x)`` with a final norm: the branch does not start with a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        x = x + self.fc1(x)
        x = x + self.fc2(x)
        return self.ln(x)


class RMSBlocks(nn.Module):
    """Pre-norm blocks with ``F.rms_norm`` (eps left to the dtype) and a spelled-out final
    RMSNorm, and a list of hidden states as HF's ``output_hidden_states`` keeps it."""

    def __init__(self, width: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        hidden = []
        for fc in self.fcs:
            hidden.append(x)
            x = x + fc(F.rms_norm(x, (x.shape[-1],)))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * self.weight, hidden


class ParallelWithNorm(ParallelBlocks):
    """GPT-J style blocks ``x + attn(ln(x)) + mlp(ln(x))`` with a final norm."""

    def __init__(self, d: int = 32) -> None:
        super().__init__(d)
        self.final = nn.LayerNorm(d)

    def forward(self, ids):
        x = self.emb(ids)
        for ln, attn, mlp in zip(self.ln, self.attn, self.mlp, strict=True):
            h = ln(x)
            x = x + attn(h) + mlp(h)
        return self.head(self.final(x))


class TestRewrittenGraph(TestCase):
    def test_block_attnres_of_a_pre_norm_gpt(self):
        # Block size 2 (one transformer layer per block): the attention sublayer of layer 1
        # starts block 2 and attends over [x_0, block 1]; the MLP after it over
        # [x_0, block 1, partial]; the final norm likewise with the output query. Each
        # norm's eps is divided by k^2 (k values: a mean at init).
        converted = hcpass.convert(tiny_gpt(layers=2), (_ids(),), family="attnres", block_size=2)
        gm = converted.graph_module
        # Each depth attention and its norm are recomputed in the backward (a checkpoint
        # region): the graph keeps their inputs, not h.
        self.assertExpectedInline(
            gm.hcpass_checkpoint_body_0.code.strip(),
            """\
def forward(self, x, linear_1, blocks_0_mlp_query, l_self_modules_blocks_modules_0_modules_ln2_parameters_weight_, l_self_modules_blocks_modules_0_modules_ln2_parameters_bias_):
    attnres_default = torch.ops.hcpass.attnres.default([x, linear_1], blocks_0_mlp_query, 1e-06);  x = linear_1 = blocks_0_mlp_query = None
    layer_norm_1 = torch.nn.functional.layer_norm(attnres_default, (32,), l_self_modules_blocks_modules_0_modules_ln2_parameters_weight_, l_self_modules_blocks_modules_0_modules_ln2_parameters_bias_, 2.5e-06);  attnres_default = l_self_modules_blocks_modules_0_modules_ln2_parameters_weight_ = l_self_modules_blocks_modules_0_modules_ln2_parameters_bias_ = None
    return (layer_norm_1,)""",
        )
        self.assertExpectedInline(
            body(gm),
            """\
positions = torch.arange(8, device = device(type='cpu'))
embedding = torch.nn.functional.embedding(args_0, tok.weight, None, None, 2.0, False, False)
embedding_1 = torch.nn.functional.embedding(positions, pos.weight, None, None, 2.0, False, False)
x = embedding + embedding_1
layer_norm = torch.nn.functional.layer_norm(x, (32,), blocks.0.ln1.weight, blocks.0.ln1.bias, 1e-05)
linear = torch.nn.functional.linear(layer_norm, blocks.0.attn.qkv.weight, blocks.0.attn.qkv.bias)
view = linear.view(2, 8, 3, 2, 16)
permute = view.permute(2, 0, 3, 1, 4)
q = permute[0]
k = permute[1]
v = permute[2]
y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal = True)
transpose = y.transpose(1, 2)
reshape = transpose.reshape(2, 8, 32)
linear_1 = torch.nn.functional.linear(reshape, blocks.0.attn.proj.weight, blocks.0.attn.proj.bias)
hcpass_checkpoint_body_0 = self.hcpass_checkpoint_body_0
tag_activation_checkpoint = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_0, x, linear_1, blocks_0_mlp_query, blocks.0.ln2.weight, blocks.0.ln2.bias, use_reentrant = False)
getitem = tag_activation_checkpoint[0]
linear_2 = torch.nn.functional.linear(getitem, blocks.0.mlp.fc.weight, blocks.0.mlp.fc.bias)
gelu = torch.nn.functional.gelu(linear_2)
linear_3 = torch.nn.functional.linear(gelu, blocks.0.mlp.proj.weight, blocks.0.mlp.proj.bias)
add = linear_1 + linear_3
hcpass_checkpoint_body_1 = self.hcpass_checkpoint_body_1
tag_activation_checkpoint_1 = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_1, x, add, blocks_1_attn_query, blocks.1.ln1.weight, blocks.1.ln1.bias, use_reentrant = False)
getitem_1 = tag_activation_checkpoint_1[0]
linear_4 = torch.nn.functional.linear(getitem_1, blocks.1.attn.qkv.weight, blocks.1.attn.qkv.bias)
view_1 = linear_4.view(2, 8, 3, 2, 16)
permute_1 = view_1.permute(2, 0, 3, 1, 4)
q_1 = permute_1[0]
k_1 = permute_1[1]
v_1 = permute_1[2]
y_1 = torch.nn.functional.scaled_dot_product_attention(q_1, k_1, v_1, is_causal = True)
transpose_1 = y_1.transpose(1, 2)
reshape_1 = transpose_1.reshape(2, 8, 32)
linear_5 = torch.nn.functional.linear(reshape_1, blocks.1.attn.proj.weight, blocks.1.attn.proj.bias)
hcpass_checkpoint_body_2 = self.hcpass_checkpoint_body_2
tag_activation_checkpoint_2 = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_2, x, add, linear_5, blocks_1_mlp_query, blocks.1.ln2.weight, blocks.1.ln2.bias, use_reentrant = False)
getitem_2 = tag_activation_checkpoint_2[0]
linear_6 = torch.nn.functional.linear(getitem_2, blocks.1.mlp.fc.weight, blocks.1.mlp.fc.bias)
gelu_1 = torch.nn.functional.gelu(linear_6)
linear_7 = torch.nn.functional.linear(gelu_1, blocks.1.mlp.proj.weight, blocks.1.mlp.proj.bias)
add_1 = linear_5 + linear_7
hcpass_checkpoint_body_3 = self.hcpass_checkpoint_body_3
tag_activation_checkpoint_3 = torch.ops.higher_order.tag_activation_checkpoint(hcpass_checkpoint_body_3, x, add, add_1, blocks_1_mlp_output_query, ln.weight, ln.bias, use_reentrant = False)
getitem_3 = tag_activation_checkpoint_3[0]
linear_8 = torch.nn.functional.linear(getitem_3, head.weight, None)
return (linear_8,)""",
        )

    def test_full_attnres_attends_over_every_earlier_output(self):
        converted = hcpass.convert(tiny_gpt(layers=3), (_ids(),), family="attnres")
        calls = _attnres_calls(converted.graph_module)
        # 6 sites: the first reads x_0 alone, site l over l + 1 values; then the output.
        self.assertEqual([k for k, _ in calls], [2, 3, 4, 5, 6, 7])
        self.assertEqual(calls[-1][1], "blocks_2_mlp_output_query")
        # No residual add is left: nothing else reads the stream.
        adds = [n for n in converted.graph_module.graph.nodes if n.name.startswith("add")]
        self.assertEqual(adds, [])

    def test_blocks_of_four_sites(self):
        converted = hcpass.convert(tiny_gpt(layers=4), (_ids(),), family="attnres", block_size=4)
        # Block 1: sites 0-3 (values [x_0] .. [x_0, partial]); block 2 starts at site 4 with
        # [x_0, block 1]; the output attends over [x_0, block 1, block 2].
        self.assertEqual(
            [k for k, _ in _attnres_calls(converted.graph_module)], [2, 2, 2, 2, 3, 3, 3, 3]
        )

    def test_side_readers_read_the_plain_sum(self):
        model = RMSBlocks()
        x = torch.randn(2, 5, 16)
        converted = hcpass.convert(model, (x,), family="attnres")
        out, hidden = converted(x)
        want_out, want_hidden = model(x)
        self.assertLess(_rel_err(out, want_out), PRESERVE_RTOL)
        for got, want in zip(hidden, want_hidden, strict=True):
            torch.testing.assert_close(got, want)
        gm = converted.graph_module
        code = gm.code + "".join(
            m.code for m in gm.children() if isinstance(m, torch.fx.GraphModule)
        )
        # F.rms_norm's eps (None: the dtype's) is written out, divided by k^2.
        eps = torch.finfo(torch.float32).eps
        self.assertIn(f"{eps / 4!r}", code)
        # the spelled-out final RMSNorm's 1e-6, over 4 values
        self.assertIn(f"{1e-6 / 16!r}", code)


@pytest.mark.parametrize(
    ("name", "block_size"),
    [
        ("tiny_gpt", None),
        ("tiny_gpt", 2),
        hf("gpt2", None),
        hf("llama", 2),
        hf("vit", None),
        hf("t5", 2),
        ("mlp_mixer", 1),
    ],
)
def test_function_preserved_at_init(name, block_size):
    factory, inputs, shapes = ZOO[name]
    model = factory().eval()
    args, kwargs = inputs()
    converted = hcpass.convert(model, args, kwargs, family="attnres", block_size=block_size)
    assert converted.report.rewritten
    with torch.no_grad():
        for shape in [None, shapes[0]]:
            if shape is not None:
                args, kwargs = inputs(*shape)
            want = logits(model(*args, **kwargs))
            assert _rel_err(logits(converted(*args, **kwargs)), want) <= PRESERVE_RTOL


def test_parallel_blocks_share_their_read():
    model = ParallelWithNorm().eval()
    ids = _ids()
    converted = hcpass.convert(model, (ids,), family="attnres")
    # Both branches of block 1 read the same values ([x_0, attn_0, mlp_0]), each with
    # its own query and its own copy of the shared norm.
    calls = _attnres_calls(converted.graph_module)
    assert [k for k, _ in calls] == [1 + 2, 1 + 2, 1 + 4]
    with torch.no_grad():
        assert _rel_err(converted(ids), model(ids)) <= PRESERVE_RTOL


@pytest.mark.parametrize(
    ("model", "example", "reason"),
    [
        hf(ZOO["bert"][0], ZOO["bert"][1], "the stream passes through layer_norm between sites"),
        (ZOO["resnet"][0], ZOO["resnet"][1], "the stream passes through relu between sites"),
        (ZOO["convnext"][0], ZOO["convnext"][1], "its channels are not the last dimension"),
        (ParallelBlocks, ZOO["parallel"][1], "the chain's output is read by linear"),
        (Residual, lambda: ((torch.randn(2, 8),), {}), "starts with linear"),
    ],
    ids=["post-norm", "post-activation", "conv", "no-final-norm", "no-pre-norm"],
)
def test_chains_that_cannot_convert_say_why(model, example, reason):
    args, kwargs = example()
    report = hcpass.explain(model(), args, kwargs, family="attnres")
    reasons = [site.reason for site in report.skipped]
    assert any(
        r.startswith("not converted to Attention Residuals") and reason in r for r in reasons
    )
    with pytest.raises(ValueError, match="no residual sites to rewrite"):
        hcpass.convert(model(), args, kwargs, family="attnres")


def _randomise_queries(converted: nn.Module) -> None:
    with torch.no_grad():
        for p in converted.mixers.parameters():
            p.normal_(std=0.5)


def test_trains_and_keeps_stable_parameter_names():
    torch.manual_seed(0)
    model = tiny_gpt(layers=2)
    ids, targets = _ids(4, 16), _ids(4, 16)
    converted = hcpass.convert(model, (ids,), family="attnres", block_size=2)
    names = [n for n, _ in converted.named_parameters() if n.startswith("mixers.")]
    assert names == [
        "mixers.blocks_0_mlp.query",
        "mixers.blocks_1_attn.query",
        "mixers.blocks_1_mlp.query",
        "mixers.blocks_1_mlp.output_query",
    ]
    optimizer = torch.optim.AdamW(hcpass.param_groups(converted, lr=3e-3))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(converted(ids).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        assert all(converted.get_parameter(n).grad is not None for n in names)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    moved = [converted.get_parameter(n).abs().max().item() for n in names]
    assert min(moved) > 1e-3, moved
    # The trained queries load into a fresh conversion and give the same output.
    fresh = hcpass.convert(tiny_gpt(layers=2), (ids,), family="attnres", block_size=2)
    fresh.load_state_dict(converted.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), converted(ids))


def test_compiled_matches_eager_with_gradients():
    torch._dynamo.reset()
    model = tiny_gpt(layers=2)
    ids = _ids()
    converted = hcpass.convert(model, (ids,), family="attnres", block_size=2)
    _randomise_queries(converted)

    def grads(run):
        converted.zero_grad()
        out = run(ids)
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in converted.named_parameters()}

    eager_out, eager_grads = grads(converted)
    compiled_out, compiled_grads = grads(torch.compile(converted, backend="hcpass"))
    torch.testing.assert_close(compiled_out, eager_out, atol=COMPILE_ATOL, rtol=0)
    for name, grad in eager_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (compiled_grads[name] - grad).abs().max() / scale < COMPILE_ATOL, name


def test_autocast_bf16_runs_near_fp32():
    model = tiny_gpt(layers=2)
    ids = _ids()
    converted = hcpass.convert(model, (ids,), family="attnres")
    _randomise_queries(converted)
    want = converted(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = converted(ids)
    # bf16 matmuls in the branches: a few bf16 roundings (2^-8 each) of the logits.
    assert _rel_err(got.float(), want) < 2**-4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"family": "attn"}, "unknown family 'attn'"),
        ({"family": "attnres", "streams": 2}, "streams: options of family='hyper-connections'"),
        ({"family": "attnres", "init": "paper"}, "init: options of family='hyper-connections'"),
        ({"block_size": 2}, "block_size is an option of family='attnres'"),
        ({"family": "attnres", "block_size": 0}, "block_size must be a positive int"),
    ],
)
def test_wrong_options_say_what_to_do(options, message):
    with pytest.raises(ValueError, match=message):
        hcpass.convert(tiny_gpt(layers=1), (_ids(),), **options)


def _saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in parameters:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).sum().backward()
    return sum(kept.values())


@pytest.mark.parametrize("layers", [4, 8])
def test_block_attnres_keeps_plain_activation_memory_plus_its_blocks(layers):
    # Issue 13: saved activations <= plain + O(N d) per position for N blocks. The depth
    # attention and its norm are recomputed in the backward, so what is kept per site is
    # the partial block where the plain model keeps its stream value.
    model = tiny_gpt(layers=layers)
    ids = _ids(4, 16)
    block_size = 4
    converted = hcpass.convert(model, (ids,), family="attnres", block_size=block_size)
    blocks = 2 * layers // block_size
    per_value = ids.numel() * model.cfg.width * 4
    assert _saved_bytes(converted, ids) <= _saved_bytes(model, ids) + (blocks + 1) * per_value


class BrokenChain(nn.Module):
    """Pre-norm blocks with a graph break in the middle of the chain."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.lns = nn.ModuleList(nn.LayerNorm(width) for _ in range(4))
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(4))
        self.final = nn.LayerNorm(width)

    def block(self, x, i: int):
        return x + self.fcs[i](self.lns[i](x))

    def forward(self, x):
        x = self.block(self.block(x, 0), 1)
        torch._dynamo.graph_break()
        return self.final(self.block(self.block(x, 2), 3))


def test_a_chain_split_by_a_graph_break_converts_after_the_break_only():
    model = BrokenChain()
    x = torch.randn(2, 3, 16)
    report = hcpass.explain(model, (x,), family="attnres")
    assert [s.status for s in report.rows] == ["skipped", "skipped", "rewritten", "rewritten"]
    assert "the chain's output is read by the graph's return" in report.rows[0].reason
    converted = hcpass.convert(model, (x,), family="attnres")
    with torch.no_grad():
        assert _rel_err(converted(x), model(x)) <= PRESERVE_RTOL


@pytest.mark.hf
def test_hf_generate_matches_the_original_at_init():
    model = ZOO["gpt2"][0]().eval()
    ids = _ids(2, 6)
    converted = hcpass.convert(model, (ids,), family="attnres", block_size=2)
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(converted.generate(ids, max_new_tokens=5, do_sample=False), want)


@pytest.mark.hf
def test_hf_gradient_checkpointing_gives_the_same_gradients():
    # The sites lie inside HF's checkpointed layers: their depth attention is recomputed
    # with the layer (no region of its own inside the layer's).
    converted = hcpass.convert(ZOO["llama"][0]().train(), (_ids(),), family="attnres", block_size=2)
    _randomise_queries(converted)
    ids = _ids()

    def grads() -> dict[str, torch.Tensor]:
        converted.zero_grad()
        converted(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in converted.named_parameters() if p.grad is not None}

    plain = grads()
    converted.gradient_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    assert any(n.startswith("mixers.") for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)
