"""Without the C++ extension the package still imports, says so once, and gives the same results."""

import os
import subprocess
import sys

SCRIPT = r"""
import warnings, torch
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import clipcid_fast
msgs = [str(x.message) for x in w if "C++ extension is not available" in str(x.message)]
assert len(msgs) == 1, msgs
from clipcid_fast import _backend
assert not _backend.has_c()
assert _backend.resolve("auto", torch.device("cpu")) == "reference"
try:
    _backend.resolve("cpu", torch.device("cpu"))
except ValueError as e:
    assert "C++ extension" in str(e), e
else:
    raise AssertionError("impl='cpu' without _C must raise ValueError")
x = torch.randn(5, 300)
torch.testing.assert_close(clipcid_fast.row_logsumexp(x), torch.logsumexp(x, 1))
print(clipcid_fast.backend_summary())
"""


def test_package_runs_on_the_reference_without_the_extension():
    env = dict(os.environ, CLIPCID_DISABLE_C="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "PyTorch reference backend" in out.stdout
