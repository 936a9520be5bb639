#!/usr/bin/env bash
# Wheels benchmarks/gpu_check.py needs on a GPU machine that reaches no package index, downloaded here
# into .whl/ (ignored by git). Its image already has torch 2.11 (CUDA 13), transformers 5.17,
# accelerate, pluggy, PyYAML, safetensors, huggingface-hub, tokenizers, numpy, scipy, rich, typer,
# ninja, nvidia-ml-py, attrs: this adds the pinned transformers and modelopt and what they and
# moe_unfuse need beyond that (versions from constraints.txt; Python 3.12, x86-64). There:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -iE "^${1//-/[-_]}==" constraints.txt; }
names=(transformers nvidia-modelopt omegaconf pulp pydantic pydantic-core annotated-types
    typing-inspection jsonschema jsonschema-specifications referencing rpds-py)
specs=()
for n in "${names[@]}"; do specs+=("$(pin "$n")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"
du -cb .whl/*.whl | tail -1 | awk '{printf "%.1f MiB in .whl (the device tool carries at most 64 MiB)\n", $1 / 1048576}'
