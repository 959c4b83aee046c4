#!/usr/bin/env bash
# The wheels of the packages normbench needs that the device tool's GPU machine lacks, into
# .whl/ (ignored by git), for benchmarks/gpu_check.sh to install there: that machine's image
# holds torch, triton, pandas, typer, rich, matplotlib and scikit-learn, but not Hydra, and
# it cannot reach a package registry. Pure-Python wheels, the versions installed here (so
# the GPU runs what the tests ran here); antlr4's runtime is built from its sdist.
# Usage, from the repository with the project installed: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python || command -v python3)
rm -rf .whl
mkdir .whl
for package in hydra-core omegaconf antlr4-python3-runtime; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$package'))")
  "$PY" -m pip wheel -q --no-deps --wheel-dir .whl "$package==$version"
done
ls .whl
