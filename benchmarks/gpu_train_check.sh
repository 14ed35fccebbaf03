#!/usr/bin/env bash
# fastres train's GPU numbers: DenseNet-BC-100 (k=12), batch 64, on CIFAR-shaped data (the built-in
# digits at 32x32, 10 classes), fastres beside torchvision's naive model on the same batches, without and
# with --cuda-graphs (both models captured): median step time (steps per second) and peak step memory
# of each, in two JSON files and their logs.
#
#   bash benchmarks/gpu_train_check.sh OUTDIR      # after benchmarks/gpu_check.sh has installed fastres
#
# About 3 minutes on an H100 with cold caches (Triton compiles the dense layers' kernels on the first steps,
# which the median leaves out).
set -uo pipefail
OUT=${1:?usage: gpu_train_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUN=(train --model densenet_bc --depth 100 --growth-rate 12 --batch-size 64 --steps 60 --compare naive
     --device cuda --no-progress)
for variant in eager cuda_graphs; do
    extra=()
    [ "$variant" = cuda_graphs ] && extra=(--cuda-graphs)
    echo "== densenet_bc100 $variant"
    timeout --kill-after=10 150 $PY -m fastres "${RUN[@]}" "${extra[@]}" --json "$OUT/densenet_bc100_$variant.json" \
        > "$OUT/densenet_bc100_$variant.log" 2>&1
    echo "   rc=$?"
    tail -8 "$OUT/densenet_bc100_$variant.log"
done
