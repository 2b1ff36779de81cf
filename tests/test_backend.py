"""backend="hcpass": found through its entry point, lowers the mixer ops per device, and
refuses to let another backend drop the mixers silently."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import models
import pytest
import torch

import hcpass
from hcpass.backend import lowering
from hcpass.ops import REFERENCE

HCPASS_OPS = {
    torch.ops.hcpass.coeffs.default,
    torch.ops.hcpass.pre.default,
    torch.ops.hcpass.post_res.default,
}


def test_registered_as_a_dynamo_backend_entry_point():
    names = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert names.get("hcpass") == "hcpass.backend:hcpass_backend"


def test_backend_works_without_importing_hcpass():
    script = textwrap.dedent(
        """
        import sys, torch
        f = torch.compile(lambda x: x + torch.tanh(x), backend="hcpass")
        x = torch.randn(4)
        torch.testing.assert_close(f(x), x + torch.tanh(x))
        assert "hcpass" in sys.modules  # loaded by Dynamo through the entry point
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def test_other_backends_cannot_drop_the_mixers():
    model = models.TinyGPT()
    x = models.token_inputs()[0]
    converted = hcpass.convert(model, x)
    with pytest.raises(RuntimeError, match="backend='hcpass'"):
        torch.compile(converted, backend="aot_eager")(*x)


def test_cpu_lowering_replaces_the_ops_by_their_references():
    converted = hcpass.convert(models.TinyGPT(), models.token_inputs()[0])
    graph = converted.graph_module.graph
    assert HCPASS_OPS <= {n.target for n in graph.nodes}
    lowering(cuda=False)(graph)
    targets = {n.target for n in graph.nodes}
    assert not targets & HCPASS_OPS
    assert {REFERENCE[op] for op in HCPASS_OPS} <= targets


def test_pass_manager_uuid_is_stable_and_depends_on_the_passes():
    assert lowering(cuda=False).uuid() == lowering(cuda=False).uuid()
    from hcpass.passes import PassManager

    assert PassManager([]).uuid() != lowering(cuda=False).uuid()


def test_cuda_lowering_fuses_site_boundaries_and_registers_the_generated_kernels():
    converted = hcpass.convert(models.TinyGPT(), models.token_inputs()[0])
    graph = converted.graph_module.graph
    lowering(cuda=True)(graph)
    # Inductor calls them as extern kernels: the chain's first coeffs and pre, its last
    # post_res, and the fused boundaries between
    targets = {n.target for n in graph.nodes}
    assert HCPASS_OPS | {torch.ops.hcpass.post_res_coeffs_pre.default} <= targets
    for name in (
        "coeffs",
        "coeffs_backward",
        "pre",
        "pre_backward",
        "post_res",
        "post_res_backward",
        "post_res_coeffs_pre",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hcpass::{name}", "CUDA"), name
    # CPU tensors still run the reference
    x = torch.randn(2, 3, 8)
    h = torch.full((3, 2), 0.5)
    torch.testing.assert_close(torch.ops.hcpass.pre(x, h), x.mean(0))


def test_backend_options_are_refused_with_a_clear_message():
    f = torch.compile(lambda x: x + 1, backend="hcpass", options={"max_autotune": True})
    with pytest.raises(Exception, match="takes no options.*max_autotune"):
        f(torch.randn(3))
