import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from tests.interpreter import round_bf16_to_nearest_even

# One Inductor/Triton cache for the whole session: cold compiles dominate the suite's time.
_CACHE = os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="hcpass-inductor-")
)
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE, "triton"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Shared by the Triton interpreter tests (test_codegen, test_attnres_ops, test_cuda_path).
@pytest.fixture(scope="module")
def interpreter() -> Iterator[ProcessPoolExecutor]:
    """A worker process whose triton was imported with TRITON_INTERPRET=1, its interpreter
    rounding fp32 -> bf16 to nearest even as a GPU does (tests/interpreter.py)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        # start it now, while the variable is set
        pool.submit(round_bf16_to_nearest_even).result()
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    yield pool
    pool.shutdown()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
