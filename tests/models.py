"""Small models the suite converts: each factory returns (model, example_inputs, vocab or None).

HF configs are tiny and random-initialised (no downloads); dropout is 0 so train-mode
outputs are deterministic and compiled == eager can be compared in training.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hcpass.tools.demo.gpt import GPT, Block, GPTConfig

VOCAB = 96
GPT_CONFIG = GPTConfig(vocab=VOCAB, width=32, layers=2, heads=2)


def tiny_gpt(width: int = GPT_CONFIG.width, layers: int = GPT_CONFIG.layers) -> GPT:
    """The demo's pre-norm GPT (`hcpass.tools.demo.gpt`) at the suite's size: two sites per
    block, ``blocks.<i>.attn`` and ``blocks.<i>.mlp``."""
    return GPT(replace(GPT_CONFIG, width=width, layers=layers))


def tiny_block(width: int) -> Block:
    """One of its blocks: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""
    return Block(replace(GPT_CONFIG, width=width))


class ParallelBlocks(nn.Module):
    """GPT-J style ``x + attn(ln(x)) + mlp(ln(x))``, one layer written branches-first."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))
        self.attn = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(2)
        )
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        h = self.ln[0](x)
        x = x + self.attn[0](h) + self.mlp[0](h)
        h = self.ln[1](x)
        x = self.mlp[1](h) + self.attn[1](h) + x
        return self.head(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision-style BasicBlocks (``out += identity; relu(out)``) with a projection shortcut."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7 in NCHW, LayerNorm + MLP channels-last, the residual
    add back in NCHW."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.dwconv(x).permute(0, 2, 3, 1))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Two stages with a downsampling layer (LayerNorm + strided conv) between them."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.stage1 = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.down = nn.Conv2d(8, 16, 2, 2)
        self.stage2 = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _quiet_hf():
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def gpt2():
    _quiet_hf()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def llama(kv_heads: int = 1):
    """`kv_heads`: 2 (one per attention head) for tensor parallelism over 2 ranks."""
    _quiet_hf()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def bert():
    _quiet_hf()
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return BertForMaskedLM(cfg)


def vit():
    _quiet_hf()
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg)


def t5():
    """Encoder-decoder: two chains (the decoder's reads the encoder's collapsed output)."""
    _quiet_hf()
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg)


def bart():
    """Encoder-decoder with post-norm blocks (LayerNorm after each residual add)."""
    _quiet_hf()
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return BartForConditionalGeneration(cfg)


def mamba():
    """State-space model: the mixer's branch projects, then runs a depthwise conv1d over the
    sequence (channels-first after a transpose); the stream's channels are its last dim."""
    _quiet_hf()
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2)
    return MambaForCausalLM(cfg)


def hf_resnet():
    """HF's ResNet (basic blocks, NCHW streams, a projection shortcut between stages)."""
    _quiet_hf()
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[2, 2],
        layer_type="basic",
        num_labels=10,
    )
    return ResNetForImageClassification(cfg)


def hf_convnext():
    """HF's ConvNeXt: a depthwise conv on the NCHW stream, then a channels-last MLP."""
    _quiet_hf()
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(
        num_channels=3,
        num_stages=2,
        hidden_sizes=[8, 16],
        depths=[2, 1],
        patch_size=2,
        num_labels=10,
    )
    return ConvNextForImageClassification(cfg)


class PreNormStack(nn.Module):
    """`depth` pre-norm residual sites on one stream and a final norm: what
    ``family="attnres"`` converts."""

    def __init__(self, depth: int = 3, width: int = 16) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.final = nn.LayerNorm(width)

    def forward(self, x):
        for norm, layer in zip(self.norms, self.layers, strict=True):
            x = x + layer(norm(x))
        return self.final(x)


class TwoChains(nn.Module):
    """Two pre-norm stacks with a projection between them: two chains, each with its own
    output."""

    def __init__(self) -> None:
        super().__init__()
        self.first = PreNormStack(depth=2)
        self.proj = nn.Linear(16, 16)
        self.second = PreNormStack(depth=1)

    def forward(self, x):
        return self.second(self.proj(self.first(x)))


class PostNorm(nn.Module):
    """BERT-style: the stream passes through a norm between sites."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.g = nn.Linear(4, 4)
        self.ln1 = nn.LayerNorm(4)
        self.ln2 = nn.LayerNorm(4)

    def forward(self, x):
        x = self.ln1(x + self.f(x))
        return self.ln2(x + self.g(x))


class SideReader(nn.Module):
    """Collects hidden states mid-chain, like HF's output_hidden_states."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.g = nn.Linear(4, 4)

    def forward(self, x):
        x = x + self.f(x)
        hidden = x
        x = x + self.g(x)
        return x, hidden


class CheckpointedGPT(GPT):
    """The tiny GPT whose blocks run under ``checkpoint(block, x, use_reentrant=...)`` (None: no
    checkpointing)."""

    def __init__(self, reentrant: bool | None, dropout: float = 0.0, layers: int = 2) -> None:
        super().__init__(replace(GPT_CONFIG, layers=layers))
        self.reentrant = reentrant
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            if self.reentrant is None:
                x = self.drop(block(x))
            else:
                x = checkpoint(lambda h, b=block: self.drop(b(h)), x, use_reentrant=self.reentrant)
        return self.head(self.ln(x))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, d: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.tokens = nn.Sequential(
            nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens)
        )
        self.ln2 = nn.LayerNorm(d)
        self.channels = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.tokens(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.ln2(x))


class MLPMixer(nn.Module):
    """Token mixing across the sequence dimension, channel mixing across features."""

    def __init__(self, image: int = 16, patch: int = 4, d: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        tokens = (image // patch) ** 2
        self.blocks = nn.Sequential(MixerBlock(tokens, d), MixerBlock(tokens, d))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch(image).flatten(2).transpose(1, 2)
        return self.head(self.ln(self.blocks(x)).mean(1))


Inputs = tuple[tuple, dict]


def token_inputs(batch: int = 2, length: int = 8) -> Inputs:
    return (torch.randint(1, VOCAB, (batch, length)),), {}


def seq2seq_inputs(batch: int = 2, length: int = 8) -> Inputs:
    ids = torch.randint(2, VOCAB, (batch, length))
    return (ids,), {"decoder_input_ids": torch.randint(2, VOCAB, (batch, max(1, length // 2)))}


def image_inputs(batch: int = 2, size: int = 8) -> Inputs:
    return (torch.randn(batch, 3, size, size),), {}


_TOKEN_SHAPES = [(3, 5), (1, 12), (4, 3)]

# name -> (factory, inputs(batch, size), the (batch, size) shapes to try besides the example)
ZOO = {
    "tiny_gpt": (tiny_gpt, token_inputs, _TOKEN_SHAPES),
    "gpt2": (gpt2, token_inputs, _TOKEN_SHAPES),
    "llama": (llama, token_inputs, _TOKEN_SHAPES),
    "bert": (bert, token_inputs, _TOKEN_SHAPES),
    "t5": (t5, seq2seq_inputs, _TOKEN_SHAPES),
    "resnet": (ResNet, image_inputs, [(1, 6), (3, 10), (2, 12)]),
    "convnext": (ConvNeXt, image_inputs, [(1, 8), (3, 12), (2, 16)]),
    "vit": (vit, lambda b=2, s=16: image_inputs(b, s), [(1, 16), (3, 16), (5, 16)]),
    "mlp_mixer": (MLPMixer, lambda b=2, s=16: image_inputs(b, s), [(1, 16), (3, 16), (5, 16)]),
    "parallel": (ParallelBlocks, token_inputs, _TOKEN_SHAPES),
}


# The ZOO entries built with `transformers`: tests using them are marked `hf`, and CI runs
# those again with the oldest transformers pyproject.toml allows.
HF_MODELS = frozenset({"gpt2", "llama", "bert", "t5", "vit"})


def hf(*values: Any, id: str | None = None) -> Any:
    """A parametrize entry that builds a model with `transformers` (marked `hf`)."""
    return pytest.param(*values, id=id, marks=pytest.mark.hf)


def zoo(names: Iterable[str] = ZOO) -> list[Any]:
    """ZOO names as parametrize entries, the HF ones marked `hf`."""
    return [hf(name, id=name) if name in HF_MODELS else name for name in sorted(names)]


def logits(output) -> torch.Tensor:
    """The main tensor of a model output (HF ModelOutput or a plain tensor)."""
    return output.logits if hasattr(output, "logits") else output


def assert_computes_like(converted: nn.Module, original: nn.Module, x: torch.Tensor) -> None:
    """The converted model's output and the input's gradient (of the summed squares) match
    the original's, in fp32."""
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = converted(mine), original(theirs)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-4)
