#!/usr/bin/env bash
# Wheels for the GPU machine, which has PyTorch, transformers and numpy but no diffusers, pydantic or
# cel-python, and reaches no registry. Run here (it uses PyPI), then carry .whl/ with the device call:
#   bash bench/gpu-wheels.sh && run(command="bash bench/gpu-check.sh $OUT", carry=[".whl"])
# The machine's python3 is CPython 3.12 on x86-64 (see the device tool's KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
# Pinned as in pyproject.toml, plus what they need that the machine's image lacks.
PKGS=(diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
      cel-python==0.5.0 lark jmespath pendulum python-dateutil tzdata google-re2 importlib-metadata zipp)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${PKGS[@]}"
# tinv itself, built from this checkout.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
du -sh .whl && ls .whl
