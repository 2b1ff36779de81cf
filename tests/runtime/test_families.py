"""The rewrite families: one `Family` record per file of `hcpass.runtime.families`, found
there, each converted model holding its record (the same object after pickle and copy)."""

from __future__ import annotations

import copy
import pickle
import sys

import pytest
import torch
from torch import nn

import hcpass
from hcpass.rewrite.attnres import AttnResOptions
from hcpass.runtime import families
from hcpass.runtime.families.hyper_connections import HyperConnectionOptions


class PreNormBlocks(nn.Module):
    def __init__(self, width: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.final = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, fc in zip(self.norms, self.fcs, strict=True):
            x = x + fc(norm(x))
        return self.final(x)


def test_the_families_are_found_with_the_default_first():
    assert hcpass.FAMILIES == families.NAMES == ("hyper-connections", "attnres")
    assert [families.family(name).name for name in families.NAMES] == list(families.NAMES)


def test_an_unknown_family_names_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown family 'attn'; choose one of hyper-connections, attnres"
    ):
        families.family("attn")


@pytest.mark.parametrize("name", families.NAMES)
def test_a_family_record_pickles_as_itself(name):
    record = families.family(name)
    assert pickle.loads(pickle.dumps(record)) is record
    assert copy.deepcopy(record) is record


@pytest.mark.parametrize(
    ("name", "options", "options_type"),
    [
        ("hyper-connections", {"streams": 2}, HyperConnectionOptions),
        ("attnres", {"block_size": 2}, AttnResOptions),
    ],
)
def test_a_converted_model_holds_its_family_and_options(name, options, options_type):
    torch.manual_seed(0)
    converted = hcpass.convert(PreNormBlocks(), (torch.randn(2, 3, 8),), family=name, **options)
    assert converted.family is families.family(name)
    assert isinstance(converted.family_options, options_type)
    assert copy.deepcopy(converted).family is converted.family


def test_a_third_family_is_one_new_file(tmp_path, monkeypatch):
    (tmp_path / "third.py").write_text(
        "from hcpass.runtime.families import Family\n"
        "from hcpass.runtime.families.hyper_connections import FAMILY as HC\n"
        "FAMILY = Family('third', HC.options, None, HC.site_module, HC.rewrite)\n"
    )
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, f"{families.__name__}.third", raising=False)
    try:
        found = families._discover()
    finally:
        sys.modules.pop(f"{families.__name__}.third", None)
    assert list(found) == ["hyper-connections", "attnres", "third"]
