"""Test set-up: Triton's interpreter on machines without a GPU, seeds, markers.

TRITON_INTERPRET must be set before Triton is first imported, and clipcid_fast imports Triton, so
this runs before any test module imports the package. On a GPU machine the variable is left alone
and the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import clipcid_fast  # noqa: F401  (imported after the env var on purpose)
from clipcid_fast import _backend

HAS_GPU = torch.cuda.is_available()


def pytest_report_header(config):
    return "clipcid_fast backends:\n  " + _backend.summary().replace("\n", "\n  ")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_device() -> torch.device:
    """Where Triton kernels run in this session: the GPU, or CPU tensors under the interpreter."""
    if _backend.triton_module() is None:
        pytest.skip("triton is not installed")
    if HAS_GPU:
        return torch.device("cuda")
    if not _backend.triton_interpreting():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return torch.device("cpu")


def backends_for(device: torch.device) -> list[str]:
    """The non-reference backends that can run on ``device`` in this session."""
    out = []
    if device.type == "cpu" and _backend.has_c():
        out.append("cpu")
    if _backend.triton_usable_on(device):
        out.append("triton")
    return out
