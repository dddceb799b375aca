#!/usr/bin/env bash
# The GPU check's build stage: clipcid_fast._C against the torch of $PY, in place (clipcid_fast/_C*.so), with
# CMakeLists.txt driven directly (no pip, no setuptools, nothing installed), then an import check.
#
#   PY=/path/to/python scripts/gpu_build.sh BUILD_DIR CUDA_ARCHS [--configure-only]
#
# CUDA_ARCHS: CMake's list, e.g. "90" (this GPU's sm) or "80;90". The build directory is kept between runs, so
# a second check in the same checkout rebuilds only what changed. --configure-only (the dry run): CMake finds
# torch, pybind11, OpenMP and nvcc and writes the build files; the extension make test built stays in use.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$1
ARCHS=$2
PY=${PY:-python3}
# CMake runs the interpreter from inside BUILD: a relative path must be made absolute first.
case $PY in /*) ;; */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # not realpath: a venv's python is a symlink
# A cache written for another checkout (same BUILD path, other clone) makes CMake refuse this source: start over.
if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$REPO" "$BUILD/CMakeCache.txt"; then
  echo "build: $BUILD was configured for another source tree; removing it"
  rm -rf "$BUILD"
fi
cmake -S "$REPO" -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$REPO/clipcid_fast" -DCLIPCID_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCHS"
if [ "${3:-}" = --configure-only ]; then
  echo "compile: skipped (--dry-run: the clipcid_fast._C built by make test is used)"
else
  cmake --build "$BUILD" -j "$(nproc)"
fi
"$PY" -c "import clipcid_fast._backend as b; assert b.has_c(), b.C_ERROR; print(b.summary())"
