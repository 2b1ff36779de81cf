import os
import tempfile

import pytest
import torch

# One Inductor/Triton cache for the whole session: cold compiles dominate the suite's time.
_CACHE = os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="hcpass-inductor-")
)
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE, "triton"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
