"""pip install --no-build-isolation ./python (from a clone of relbias; see docs/python.md).

The extension module is built by the project's CMake (option RELBIAS_PYTHON), the same build
that CI tests: this file only runs it for the interpreter doing the install and copies the
module into the wheel. Needs cmake, a C++20 compiler, Eigen 3.4 and pybind11 (Debian:
cmake g++ libeigen3-dev pybind11-dev), and PyTorch at run time (Debian: python3-torch).
"""

import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent  # the relbias clone: CMakeLists.txt and include/


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build = pathlib.Path(self.build_temp).resolve() / "cmake"
        build.mkdir(parents=True, exist_ok=True)
        configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DRELBIAS_PYTHON=ON",
                     "-DRELBIAS_BUILD_TESTS=OFF", "-DRELBIAS_BUILD_EXAMPLES=OFF", f"-DPython3_EXECUTABLE={sys.executable}"]
        subprocess.run(configure, check=True)
        jobs = os.environ.get("RELBIAS_BUILD_JOBS", "2")
        subprocess.run(["cmake", "--build", str(build), "--target", "relbias_python", "-j", jobs], check=True)
        built = next((build / "python" / "relbias").glob("_relbias*.so"))
        target = pathlib.Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)


setup(
    name="relbias",
    version="0.1.0",
    description="Relative positional attention biases with fused CPU attention kernels, for PyTorch",
    license="MIT",
    packages=["relbias"],
    ext_modules=[Extension("relbias._relbias", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    zip_safe=False,
)
