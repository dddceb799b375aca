#!/usr/bin/env bash
# Everything a fresh machine (Python 3.11, gcc, cmake, nvcc; nothing else) needs, idempotent:
#   1. Debian packages the project uses (the Fashion-MNIST data set, see shared/offline-assets.md);
#   2. a virtualenv (.venv, or $VENV) with torch pinned first — the pin must come before anything
#      that depends on torch, or pip resolves a different multi-GB CUDA build;
#   3. the package in editable mode, built against that torch with --no-build-isolation (an
#      isolated build would install a second torch into a temporary environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP=(env PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q)

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "setup: installing Debian package dataset-fashion-mnist"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "setup: torch (pinned) into $VENV"
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"
echo "setup: build tools and clipcid_fast (compiles clipcid_fast._C: about 2 minutes the first time)"
"${PIP[@]}" setuptools wheel pybind11==3.1.0 ninja==1.13.2 cmake==4.4.4 2>&1 | grep -v "is ignored: it is neither" || true
"${PIP[@]}" --no-build-isolation -e ".[test,bench,balance,log]" 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -m clipcid_fast info
