"""The ``hcpass`` command (explain, manifolds, errors, ``python -m hcpass``) and the
``TORCH_LOGS="+hcpass"`` logging."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hcpass
from hcpass import logs
from hcpass.tools import cli
from tests.factories import rewritten_tiny_gpt

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_explain_prints_the_report_table(capsys):
    code, out, _ = run_cli(capsys, "explain", "tests.factories:tiny_gpt")
    assert code == 0
    assert out.splitlines()[0].split() == ["site", "status", "reason"]
    assert "blocks.0.attn" in out and "blocks.0.mlp" in out
    assert "2 rewritten" in out


def test_explain_json_is_the_report_dict(capsys):
    code, out, _ = run_cli(capsys, "explain", "tests.factories:tiny_gpt", "--json")
    assert code == 0
    report = json.loads(out)
    rewritten = [s["name"] for s in report["sites"] if s["status"] == "rewritten"]
    assert rewritten == ["blocks.0.attn", "blocks.0.mlp"]
    assert report["graphs"] == 1


def test_explain_passes_example_kwargs(capsys):
    code, out, _ = run_cli(capsys, "explain", "tests.factories:tiny_gpt_kwargs", "--json")
    assert code == 0
    assert [s["name"] for s in json.loads(out)["sites"] if s["status"] == "rewritten"] == [
        "gpt.blocks.0.attn",
        "gpt.blocks.0.mlp",
    ]


def test_explain_of_a_model_without_sites_reports_none(capsys):
    code, out, _ = run_cli(capsys, "explain", "tests.factories:no_sites")
    assert code == 0
    assert "0 rewritten" in out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.factories", "expected MODULE:FACTORY"),
        ("tests.factories:", "expected MODULE:FACTORY"),
        ("no_such_module_hcpass:make", "cannot import module 'no_such_module_hcpass'"),
        ("tests.factories:missing", "has no attribute 'missing'"),
        ("tests.factories:TINY", "not a callable factory"),
        ("tests.factories:not_a_model", "returned int; expected (model, example_inputs)"),
    ],
)
def test_explain_bad_factory_is_a_clear_error(capsys, spec, message):
    code, out, err = run_cli(capsys, "explain", spec)
    assert code == 2
    assert out == ""
    assert err.startswith("hcpass explain: error: ")
    assert message in err


def test_explain_reports_what_explain_rejects(capsys, monkeypatch):
    from tests import factories

    monkeypatch.setattr(factories, "not_a_model", lambda: ("model", ()), raising=True)
    code, _, err = run_cli(capsys, "explain", "tests.factories:not_a_model")
    assert code == 2
    assert "returned a str as the model, not an nn.Module" in err


def test_manifolds_lists_names_and_descriptions(capsys):
    code, out, _ = run_cli(capsys, "manifolds")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(hcpass.available_manifolds())
    assert any(line.startswith("sinkhorn") and "Sinkhorn" in line for line in lines)


def test_no_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_factory_module_is_found_in_the_working_directory(capsys, monkeypatch, tmp_path):
    # A console script's sys.path does not contain the working directory; the CLI adds it.
    factory = "from tests.factories import tiny_gpt as make\n"
    (tmp_path / "my_models_for_hcpass.py").write_text(factory)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    code, out, _ = run_cli(capsys, "explain", "my_models_for_hcpass:make")
    assert code == 0
    assert "2 rewritten" in out
    sys.modules.pop("my_models_for_hcpass", None)


def test_python_dash_m_hcpass():
    done = subprocess.run(
        [sys.executable, "-m", "hcpass", "explain", "tests.factories:tiny_gpt", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["graphs"] == 1


# ------------------------------------------------------------------------------- logs
def test_rewritten_graph_logs_sites_at_info_and_code_at_debug(caplog):
    gm, mixed = rewritten_tiny_gpt()

    def ours():  # other loggers (Dynamo's) may emit into caplog during the suite
        return [r for r in caplog.records if r.name == "hcpass"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hcpass"):
        logs.rewritten_graph(gm, mixed.mixer_names, mixed.site_count, "test")
    assert [r.levelno for r in ours()] == [logging.INFO]
    assert "blocks_0_attn, blocks_0_mlp" in ours()[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="hcpass"):
        logs.rewritten_graph(gm, mixed.mixer_names, mixed.site_count, "test")
    assert [r.levelno for r in ours()] == [logging.INFO, logging.DEBUG]
    assert "torch.ops.hcpass.post_res" in ours()[1].getMessage()


def test_register_makes_hcpass_a_torch_logging_component():
    from torch._logging import _internal

    logs.register()
    logs.register()  # idempotent
    assert _internal.log_registry.log_alias_to_log_qnames["hcpass"] == ["hcpass"]


def test_torch_logs_plus_hcpass_shows_the_rewritten_graph(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.factories import rewritten_tiny_gpt\n"
        "from hcpass import logs\n"
        "gm, mixed = rewritten_tiny_gpt()\n"
        "logs.rewritten_graph(gm, mixed.mixer_names, mixed.site_count, 'check')\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "TORCH_LOGS": "+hcpass"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "check: rewrote a graph: 2 site run(s), mixers blocks_0_attn, blocks_0_mlp" in done.stderr
    )
    assert "torch.ops.hcpass.coeffs" in done.stderr
