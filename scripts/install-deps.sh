#!/usr/bin/env bash
# Installs, as root on Debian 12, whatever the project needs and the machine lacks. Nothing else.
set -euo pipefail
packages=(cmake make g++ clang libomp-dev libeigen3-dev catch2 libbenchmark-dev python3-matplotlib python3-numpy fortunes
          openmpi-bin libopenmpi-dev  # MPI: relbias::mpi (ring attention), its tests, example 06, bench_ring
          python3-dev pybind11-dev python3-torch python3-pytest  # the Python package (python/), its tests and example
          python3-pip python3-venv python3-setuptools python3-wheel  # pip install --no-build-isolation ./python (README)
          libopenblas0-pthread)  # PyTorch's matrix products: without it Debian's torch uses the reference BLAS (7x slower)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
