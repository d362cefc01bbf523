#!/usr/bin/env bash
# The GPU checks of issues #11 and #12 on a CUDA machine, each part bounded in time so that the others still
# report: `dit` and `pixart` (bench/speed.py on a random DiT-XL/2 at 256 px and PixArt-XL/2 at 512 px, fp16),
# `profile` (where a DiT-XL/2 generation's time goes in the graphs mode: fixed, per uncached and per all-reuse
# step, top kernels), `tests` (the CUDA tests of the graphs mode) and `batching` (the in-process batching
# ceiling of DiT-XL/2). Results and one log per run go to $OUT (default bench/results/gpu).
#
#     bash bench/gpu.sh                       # all parts, the floors of #11 first
#     bash bench/gpu.sh tests dit             # some
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
parts=${*:-dit profile tests batching pixart}
exec > >(tee "$OUT/gpu-${parts// /-}.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
for part in $parts; do
    echo "== $part"
    case $part in
    tests) timeout 110 $PY -m pytest -q -p no:cacheprovider tests/unit/test_graphs.py ;;
    dit) timeout 230 $PY bench/speed.py --device cuda --model dit-xl --repeats 5 --out "$OUT" ;;
    profile) timeout 150 $PY bench/speed.py --device cuda --model dit-xl --profile --mode graphs ;;
    pixart) timeout 150 $PY bench/speed.py --device cuda --model pixart-xl --repeats 3 --mode graphs --out "$OUT" ;;
    batching) timeout 80 $PY bench/batching.py --in-process --device cuda --model dit-xl --mode graphs --out "$OUT" ;;
    *) echo "unknown part $part: choose from dit profile tests batching pixart" && exit 2 ;;
    esac
    echo "== $part: exit $?"
done
