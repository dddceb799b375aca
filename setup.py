"""Thin driver: builds clipcid_fast._C by running CMake (CMakeLists.txt holds every flag and source).

Set CLIPCID_NO_EXT=1 to skip the extension (the package then runs on its PyTorch reference backend),
CLIPCID_CUDA=0 to skip the CUDA kernels.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or "cmake"
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCLIPCID_CUDA={'OFF' if os.environ.get('CLIPCID_CUDA', '1') == '0' else 'ON'}",
        ]
        subprocess.run(configure, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


ext_modules = [] if os.environ.get("CLIPCID_NO_EXT") == "1" else [CMakeExtension("clipcid_fast._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
