"""Test set-up: Triton's interpreter on machines without a GPU, seeds, markers, CUDA targets.

TRITON_INTERPRET must be set before Triton is first imported, and clipcid_fast imports Triton, so
this runs before any test module imports the package. On a GPU machine the variable is left alone
and the same tests run the compiled kernels on CUDA tensors.

Kernel tests run each case on every target this session has: ``TARGETS_CPU`` (the C++ kernels) and the
``on_cuda(...)`` params (Triton compiled for the GPU, the CUDA C++ kernels), marked ``gpu`` so that they
skip cleanly without a device (``scripts/gpu_check.sh`` runs them on one). A test that needs an optional
package that is not installed (open_clip, faiss, matplotlib, ...) is reported as skipped with the reason.

``CLIPCID_CUDA_TARGETS_ON_CPU=1`` (``scripts/gpu_check.sh --dry-run``, no GPU): the CUDA-target cases run on CPU
tensors (Triton through the interpreter; the CUDA C++ kernels skip), so the GPU test plumbing is exercised in CI
between GPU slots. Which cases the GPU check runs (on the GPU and in its dry run alike: the same marker expression,
then one case per test and variant, in parallel shards) is ``benchmarks/gpu_tests.py``'s, not this file's.
"""

import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import clipcid_fast  # noqa: F401  (imported after the env var on purpose)
from clipcid_fast import _backend

HAS_GPU = torch.cuda.is_available()
CUDA_TARGETS_ON_CPU = os.environ.get("CLIPCID_CUDA_TARGETS_ON_CPU") == "1" and not HAS_GPU


def pytest_report_header(config):
    return "clipcid_fast backends:\n  " + _backend.summary().replace("\n", "\n  ")


# Packages a test may need that a bare GPU machine may lack; a ModuleNotFoundError for one is a skip.
OPTIONAL_PACKAGES = ("open_clip", "faiss", "matplotlib", "psutil", "webdataset", "transformers", "pandas")


def _missing_optional(text: str) -> str | None:
    m = re.search(r"No module named '([\w.]+)'", text)
    if m and m.group(1).split(".")[0] in OPTIONAL_PACKAGES:
        return m.group(1).split(".")[0]
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.excinfo is None or not call.excinfo.errisinstance(ModuleNotFoundError):
        return
    name = _missing_optional(str(call.excinfo.value))
    if name is not None:
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs {name}, which is not installed")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        name = _missing_optional(str(rep.longrepr))
        if name is not None:
            rep.outcome = "skipped"
            rep.longrepr = (str(collector.path), 0, f"Skipped: needs {name}, which is not installed")
            rep.result = []


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


TARGETS_CPU = [pytest.param(("cpu", "cpu"), id="cpu")]


def on_cuda(*impls: str) -> list:
    """Params ``(impl, "cuda")`` for a kernel test: each impl run on CUDA tensors, marked ``gpu`` (and
    ``cuda_target``; in the dry run only the latter: they run on CPU tensors)."""
    marks = [pytest.mark.cuda_target] + ([] if CUDA_TARGETS_ON_CPU else [pytest.mark.gpu])
    return [pytest.param((impl, "cuda"), marks=marks, id=f"cuda-{impl}") for impl in impls]


def require(target: tuple[str, str]) -> tuple[str, torch.device]:
    """``(impl, device)`` of a target, skipping (with the reason) when this build cannot run it."""
    impl, device = target
    if device == "cuda" and CUDA_TARGETS_ON_CPU:
        if impl == "cuda":
            pytest.skip("dry run without a GPU: the CUDA C++ kernels cannot run")
        device = "cpu"
    if impl == "cpu" and not _backend.has_c():
        pytest.skip("C++ extension clipcid_fast._C not built")
    if impl == "triton" and _backend.triton_module() is None:
        pytest.skip("triton is not installed")
    if impl == "cuda" and not _backend.cuda_kernels_built():
        pytest.skip("clipcid_fast._C was built without the CUDA kernels (no nvcc, or CLIPCID_CUDA=0)")
    return impl, torch.device(device)


def backends_for(device: torch.device) -> list[str]:
    """The non-reference backends that can run on ``device`` in this session."""
    out = []
    if device.type == "cpu" and _backend.has_c():
        out.append("cpu")
    if _backend.triton_usable_on(device):
        out.append("triton")
    return out
