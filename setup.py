"""pip entry point: builds csrc/ with CMake into knnfast/_C*.so.

CMake is the single build description (CMakeLists.txt); this file only drives it.
Environment:
  KNNFAST_CUDA=auto|on|off   build the CUDA kernels (auto: when torch has CUDA and nvcc exists)
  KNNFAST_BUILD_TYPE=Release|Debug|RelWithDebInfo
  MAX_JOBS=N                 parallel compile jobs (default: number of cores)

The library is compiled against the torch installed in this environment, so build without
build isolation (`pip install --no-build-isolation .`, `python -m build --no-isolation`):
pyproject.toml lists no torch, and an isolated build fails here with that advice.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def import_installed_torch():
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            "knnfast: torch is not importable by this build. knnfast compiles against the "
            "torch already installed (a C++ extension works only with the torch it was built "
            "against), so install torch first (e.g. `pip install torch==2.13.0`; supported: "
            ">= 2.4) and build without build isolation, which hides it: "
            "`pip install --no-build-isolation .` or `python -m build --no-isolation`"
        ) from e
    return torch


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        torch = import_installed_torch()

        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(out_path)
        root = os.path.dirname(os.path.abspath(__file__))
        build_dir = os.path.join(root, "build", "cmake")
        os.makedirs(build_dir, exist_ok=True)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        cfg = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('KNNFAST_BUILD_TYPE', 'Release')}",
            f"-DKNNFAST_CUDA={os.environ.get('KNNFAST_CUDA', 'auto')}",
            f"-DKNNFAST_OUTPUT_DIR={out_dir}",
            f"-DKNNFAST_OUTPUT_NAME=_C{os.path.splitext(suffix)[0]}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTORCH_CMAKE_PREFIX={torch.utils.cmake_prefix_path}",
        ]
        # cmake / ninja installed into the same environment (pip packages) come first
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        if shutil.which("ninja", path=env["PATH"]):
            cfg.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", root, *cfg], cwd=build_dir, env=env)
        subprocess.check_call(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, env=env)


setup(ext_modules=[CMakeExtension("knnfast._C")], cmdclass={"build_ext": CMakeBuild})
