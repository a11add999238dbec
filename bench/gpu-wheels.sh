#!/usr/bin/env bash
# Download (here, where a package registry is reachable) the wheels bench/gpu.sh installs on a
# bare GPU machine that has Python 3.12 and PyTorch (CUDA) but no registry: DeepSpeed, pydantic
# and the few pure-Python packages lmforge's model + engine path imports (not Ray, MLflow or the
# data path). Versions are constraints.txt's pins. Into .whl/ (ignored by git), about 25 MB;
# copy the repository together with .whl/ to the GPU machine, then run bench/gpu.sh there.
#   bash bench/gpu-wheels.sh            (WHEELS=dir to choose the folder)
# DeepSpeed publishes only a source distribution: it is built here into a pure-Python wheel
# (DS_BUILD_OPS=0: no compiled op; the GPU machine JIT-builds none for this benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-.venv/bin/python}
pin() { grep -i "^$1==" constraints.txt | head -1; }
PKGS=(pydantic pydantic_core annotated-types typing-inspection typing_extensions PyYAML
      einops hjson msgpack ninja numpy packaging psutil py-cpuinfo tqdm)
mkdir -p "$WHEELS"
pins=()
for p in "${PKGS[@]}"; do
  v=$(pin "$p") || { echo "gpu-wheels: $p has no pin in constraints.txt" >&2; exit 1; }
  pins+=("$v")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$WHEELS" "${pins[@]}"
ds=$(pin deepspeed)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$ds"
ls -1 "$WHEELS"
du -sh "$WHEELS"
