"""``hcpass demo`` end to end on a tiny model, and its report logic on made-up results."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import hcpass
from hcpass.tools import cli, inspection
from hcpass.tools.demo import corpus, options, report, train, variants
from hcpass.tools.demo.gpt import GPT, GPTConfig

TINY_ARGS = [
    "--steps", "3", "--layers", "1", "--width", "16", "--heads", "2", "--context", "8",
    "--batch", "2",
]  # fmt: skip


def test_demo_runs_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    code = cli.main(["demo", *TINY_ARGS, "--manifolds", "sinkhorn,hc", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr()
    assert "held-out loss" in out.out and "ms/step" in out.out
    for name in ("plain", "sinkhorn", "hc"):
        assert any(line.startswith(name) for line in out.out.splitlines())
    assert "3/3" in out.err  # the progress line

    results = json.loads((tmp_path / "results.json").read_text())
    variants = {v["name"]: v for v in results["variants"]}
    assert list(variants) == ["plain", "sinkhorn", "hc"]
    assert all(len(v["curve"]) == 3 for v in variants.values())
    assert variants["plain"]["gain"] == []
    assert [g["depth"] for g in variants["sinkhorn"]["gain"]] == [1, 2]  # one block, two sites
    assert variants["sinkhorn"]["params"] > variants["plain"]["params"]
    # Same initial weights, same first batch, function-preserving mixer init: same first loss.
    first = [v["curve"][0] for v in variants.values()]
    assert max(first) - min(first) < 1e-4
    assert torch.get_num_threads() == threads  # --threads is restored afterwards
    # After training, every variant's magnitudes and gradients over depth, plain's included.
    for variant in variants.values():
        profile = variant["depth_profile"]
        assert [s["site"] for s in profile["sites"]] == ["blocks_0_attn", "blocks_0_mlp"]
        assert all(s["grad_norm"] > 0 and s["stream_rms"] > 0 for s in profile["sites"])
    assert "Over depth, first -> last site" in out.out

    if importlib.util.find_spec("matplotlib") is not None:
        pictures = {"losses.png", "depth.png", "gain.png", "mixers_sinkhorn.png", "mixers_hc.png"}
        assert pictures <= {p.name for p in tmp_path.iterdir()}


def test_demo_runs_an_attnres_variant(tmp_path, capsys):
    args = ["--manifolds", "attnres", "--block-size", "2", "--out", str(tmp_path)]
    assert cli.main(["demo", *TINY_ARGS, *args]) == 0
    out = capsys.readouterr()
    assert any(line.startswith("attnres") for line in out.out.splitlines())

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["train"]["block_size"] == 2
    plain, attnres = results["variants"]
    assert attnres["name"] == "attnres" and attnres["manifold"] is None
    assert len(attnres["curve"]) == 3
    assert abs(attnres["curve"][0] - plain["curve"][0]) < 1e-4  # it starts as the plain model
    assert attnres["params"] == plain["params"] + 2 * 16  # the second site's query, the output's
    assert attnres["gain"] == []  # no H_res: weights over depth instead
    weights = attnres["depth_weights"]
    # One block of two sites: the second site and the output read the input and that block.
    assert list(weights) == ["blocks_0_attn", "blocks_0_mlp", "blocks_0_mlp:output"]
    assert [len(w) for w in weights.values()] == [1, 2, 2]
    for w in weights.values():
        assert sum(w) == pytest.approx(1.0, abs=1e-5)
    if importlib.util.find_spec("matplotlib") is not None:
        names = {p.name for p in tmp_path.iterdir()}
        assert "depth_attnres.png" in names and "mixers_attnres.png" not in names


def nan_gradient_from_call(model: torch.nn.Module, call: int) -> None:
    """From its `call`-th training forward on, `model`'s output passes a NaN gradient back
    (its loss stays finite): what the saturated Sinkhorn backward did in issue 26."""
    calls = []

    def hook(module, args, output):
        if module.training:
            calls.append(None)
            if len(calls) >= call:
                output.register_hook(lambda grad: grad * float("nan"))

    model.register_forward_hook(hook)


def test_a_diverged_variant_is_reported_and_the_others_kept(tmp_path, capsys, monkeypatch):
    convert = variants.convert

    def hc_diverges_at_step_2(model, variant, example, cfg):
        converted = convert(model, variant, example, cfg)
        if variant == "hc":
            nan_gradient_from_call(converted, 2)
        return converted

    monkeypatch.setattr(variants, "convert", hc_diverges_at_step_2)
    args = ["--manifolds", "sinkhorn,hc", "--out", str(tmp_path)]
    assert cli.main(["demo", *TINY_ARGS, *args]) == 0
    out = capsys.readouterr()
    assert "hc           DIVERGED at step 2/3" in out.err
    hc_row = next(line for line in out.out.splitlines() if line.startswith("hc "))
    assert "diverged at step 2" in hc_row and "nan" not in hc_row
    assert "hc: DIVERGED at step 2" in out.out
    assert "sinkhorn: " in out.out and "same held-out loss" not in out.out.split("hc: ")[1]

    results = json.loads((tmp_path / "results.json").read_text())
    runs = {v["name"]: v for v in results["variants"]}
    assert results["diverged"] == {"hc": 2} and "hc" not in results["worse_than_baseline"]
    assert runs["hc"]["diverged_at"] == 2 and len(runs["hc"]["curve"]) == 2
    assert runs["hc"]["val_loss"] != runs["hc"]["val_loss"]  # NaN
    for name in ("plain", "sinkhorn"):
        assert runs[name]["diverged_at"] is None and len(runs[name]["curve"]) == 3
        assert torch.tensor(runs[name]["val_loss"]).isfinite()


def test_training_stops_before_a_nan_loss_reaches_the_weights():
    cfg = train.TrainConfig(steps=5, batch=2, corpus_bytes=50_000)
    gpt = GPTConfig(context=8, width=16, layers=1, heads=2)
    data = corpus.load_corpus(cfg.corpus_bytes)
    torch.manual_seed(0)
    model = GPT(gpt)
    calls = []

    def nan_from_step_3(x):
        calls.append(None)
        return model(x) * (float("nan") if len(calls) >= 3 else 1.0)

    result = train.train("plain", model, nan_from_step_3, data, gpt, cfg)
    assert result.diverged_at == 3 and len(result.curve) == 3 and len(calls) == 3
    assert all(p.isfinite().all() for p in model.parameters())


def test_attnres_is_a_variant_beside_the_manifolds():
    assert options.choose_manifolds("sinkhorn,attnres") == (["sinkhorn", "attnres"], [])


def test_same_init_same_data_gives_identical_plain_runs():
    # The baseline is deterministic, so differences between variants come from hcpass.
    cfg = train.TrainConfig(steps=3, batch=2, corpus_bytes=50_000)
    model = GPTConfig(context=8, width=16, layers=1, heads=2)
    data = corpus.load_corpus(cfg.corpus_bytes)
    held_out = train.validation_batches(data[1], model, cfg)
    torch.manual_seed(cfg.seed)
    base = GPT(model)
    runs = [variants.run_variant("plain", None, base, data, held_out, cfg)[0] for _ in range(2)]
    assert runs[0].curve == runs[1].curve
    assert runs[0].val_loss == runs[1].val_loss


def test_corpus_is_deterministic_and_validation_files_are_held_out():
    taught, val = corpus.load_corpus(100_000)
    again_train, again_val = corpus.load_corpus(100_000)
    assert torch.equal(taught, again_train) and torch.equal(val, again_val)
    assert len(taught) == 90_000 and len(val) == 10_000
    assert int(taught.max()) < 256 and int(val.min()) >= 0


def test_unknown_manifold_is_a_usage_error(tmp_path, capsys):
    code = cli.main(["demo", *TINY_ARGS, "--manifolds", "sinkhorn,nope", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown manifold(s) nope" in err and "sinkhorn" in err
    assert not (tmp_path / "results.json").exists()


def test_default_manifolds_skip_what_is_not_registered(monkeypatch):
    monkeypatch.setattr(hcpass, "available_manifolds", lambda: {"sinkhorn (mhc)": "mHC"})
    chosen, notes = options.choose_manifolds(None)
    assert chosen == ["sinkhorn", "attnres"]
    assert any("'hc' is not registered" in n for n in notes)
    assert any("kronecker" in n for n in notes)
    assert options.choose_manifolds("mhc") == (["mhc"], [])


def test_default_manifolds_include_an_exact_one():
    registered = options.registered_manifolds()
    chosen, notes = options.choose_manifolds(None)
    assert [m for m in chosen if m in options.DEFAULT_MANIFOLDS] == [
        m for m in options.DEFAULT_MANIFOLDS if m in registered
    ]
    exact = [m for m in options.EXACT if m in registered]
    assert [m for m in chosen if m in options.EXACT] == exact[:1]
    assert chosen[-1] == "attnres"  # not a manifold: always there
    assert len(notes) == len(options.DEFAULT_MANIFOLDS) + 1 - (len(chosen) - 1)


def result(name: str, val_loss: float, ms: float = 10.0) -> variants.Result:
    return variants.Result(name, None, 100, [1.0], 1.0, val_loss, ms, 1.0)


def test_verdicts_say_plainly_which_variant_is_worse():
    results = [result("plain", 2.0), result("sinkhorn", 2.1, 20.0), result("hc", 1.9)]
    lines = report.verdicts(results)
    assert lines[0].startswith("sinkhorn: WORSE than plain") and "2.0x the step time" in lines[0]
    assert lines[1].startswith("hc: better than plain")
    assert (
        "the same held-out loss" in report.verdicts([result("plain", 2.0), result("x", 2.00001)])[0]
    )


def test_nan_losses_are_never_compared():
    nan = float("nan")
    diverged = result("sinkhorn", nan)
    diverged.diverged_at = 1128
    lines = report.verdicts([result("plain", 1.8861), diverged, result("hc", nan)])
    assert lines[0].startswith("sinkhorn: DIVERGED at step 1128")
    assert lines[1].startswith("hc: held-out loss not finite (nan)")
    assert not any("same held-out loss" in line or "better" in line for line in lines)
    lines = report.verdicts([result("plain", nan), result("hc", 1.9)])
    assert lines == ["plain: held-out loss not finite (nan); no variant is compared with it."]
    text = report.results_table([result("plain", 1.8861), diverged])
    assert "diverged at step 1128" in text.splitlines()[3] and "nan" not in text


def test_depth_table_prints_non_finite_values():
    def profile(stream: float) -> inspection.DepthProfile:
        sites = tuple(
            inspection.SiteProfile(f"s{d}", "s1", d, 1.0, 0.5, d * stream, 0.1) for d in (1, 2)
        )
        return inspection.DepthProfile("plain", sites, 2.0)

    plain, diverged = result("plain", 2.0), result("hc", float("nan"))
    plain.depth_profile, diverged.depth_profile = profile(1.0), profile(float("nan"))
    lines = report.depth_table([plain, diverged, result("sinkhorn", 2.0)]).splitlines()
    assert lines[2].split() == "plain 1 -> 1 0.5 -> 0.5 1 -> 2 0.1 -> 0.1".split()
    assert lines[3].split()[7:10] == ["nan", "->", "nan"]  # hc's stream RMS
    assert len(lines) == 4  # a result without a profile has no row


def test_table_has_one_row_per_variant():
    text = report.results_table([result("plain", 2.0), result("sinkhorn", 2.05)])
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["variant", "train"]
    assert lines[2].startswith("plain") and lines[3].startswith("sinkhorn")
    assert "+0.0500" in lines[3]


@pytest.mark.parametrize("flag", [["--steps", "0"], ["--threads", "0"], ["--block-size", "0"]])
def test_bad_numbers_are_usage_errors(flag, tmp_path, capsys):
    assert cli.main(["demo", *TINY_ARGS, *flag, "--out", str(tmp_path)]) == 2
    assert "must be at least 1" in capsys.readouterr().err
