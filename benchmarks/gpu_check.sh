#!/usr/bin/env bash
# One run on a lent GPU machine: build, GPU tests, the key benchmarks, JSON and a report.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Sized for 8 minutes on an H100 with cold caches (Triton, cuDNN and torch.compile all
# start empty): each stage has its own time limit (480 s in all), and a stage that fails or runs out
# of time is recorded in OUTDIR/status.json while the others still run.
#
# Included: `fastres check`'s self-test on CUDA; the tests on CUDA; add_relu at ResNet-50 batch 64 (bf16 channels_last and
# fp32 NCHW, with the copy-bandwidth ceiling); BN-ReLU / BN-add-ReLU at ResNet-50's
# shapes, batch 64, bf16 channels_last; BN-ReLU-Conv2d (fastres vs cuDNN) at DenseNet-121's
# 1x1 and 3x3 convolutions and pre-activation ResNet-50's two strided ones, batch 64, bf16
# channels_last; ResNet-50 (against torchvision) and ResNetV2-50 (against timm) bf16
# channels_last training steps at batch 64; DenseNet-121 at batch 64, 224x224, bf16, on each dense path
# (fused Triton, fastres._C's CUDA kernels, naive, checkpointed). Left out (run the suites for them): torch.compile in the op
# suites and the training steps (its cold compile alone is minutes), batch 256, float32
# and NCHW batch norm and BN-ReLU-Conv2d, BN-ReLU-Conv2d's other ResNet-50 shapes, ResNet-50
# batch 128, DenseNet-BC, the blocks suite, torch.compile's DenseNet and every CPU case.
# Then pack OUTDIR into one archive for the trip back (a lent machine returns at most 8 files), e.g.
#   bash benchmarks/gpu_check.sh /tmp/gc; tar czf "$OUT/gpu_check.tar.gz" -C /tmp gc
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$OUT"
# The convolutions' tuning choices (one JSON per device and versions) come back with the results.
export FASTRES_CACHE_DIR="$OUT/tuning"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
declare -A STATUS

stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    STATUS[$name]="rc=$rc seconds=$((SECONDS - t0))"
    echo "   rc=$rc in $((SECONDS - t0))s (log: $OUT/$name.log)"
    tail -5 "$OUT/$name.log"
}

stage install 70 env MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e .
stage env 15 $PY -c "
import json, sys, torch, triton, fastres, fastres.functional as F
p = torch.cuda.get_device_properties(0)
json.dump({'device': torch.cuda.get_device_name(), 'sms': p.multi_processor_count,
           'memory_gb': round(p.total_memory / 2**30, 1), 'torch': torch.__version__, 'cuda': torch.version.cuda,
           'triton': triton.__version__, 'python': sys.version.split()[0], 'fastres': fastres.__version__,
           'extension': F.extension_available()}, open('$OUT/env.json', 'w'), indent=1)
print(open('$OUT/env.json').read())"
# Every op and block against eager on this GPU, as a user's `fastres check` runs it.
stage check 30 $PY -m fastres check --json "$OUT/check.json"
# The GPU paths first (kernels, then blocks and models); the CPU-only checks (sm_90 static
# compile) already ran where there was no GPU.
# FASTRES_AUTOTUNE=0: the convolutions take their first config at each of the tests' many shapes
# (test_every_launch_config_matches_eager runs every config); the benchmarks autotune.
# fastres._C's CUDA kernels first, which have never run anywhere else: every op in four dtypes
# against float64 eager, and the DenseNet tests on that engine.
stage tests_c 60 env FASTRES_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT/tests_c.xml" tests/test_ext.py tests/test_ext_cuda.py "tests/test_densenet.py" -k "cuda or extension"
stage tests 85 env FASTRES_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" -k "not extension" \
    tests/test_add_relu.py tests/test_batch_norm.py tests/test_op_tooling.py \
    tests/test_bn_relu_conv.py tests/test_densenet.py tests/test_resnet.py \
    tests/test_convert.py tests/test_bad_input.py tests/test_resnetv2.py tests/test_convert_timm.py

BENCH=(-p no:cacheprovider --benchmark-only -q)
stage bench_add_relu 30 $PY -m pytest benchmarks/test_add_relu.py "${BENCH[@]}" \
    -k "N64 and ((bfloat16 and channels_last) or (float32 and nchw)) and (fastres or eager or copy) and not compile" \
    --benchmark-json "$OUT/add_relu.json"
stage bench_batch_norm 40 $PY -m pytest benchmarks/test_batch_norm.py "${BENCH[@]}" \
    -k "N64 and bfloat16 and channels_last and not compile" --benchmark-json "$OUT/batch_norm.json"
# Most of this stage is Triton compiling and autotuning the convolution kernels (cold cache).
# The fastres cases record which candidate won each launch (a tile config or "unfused": BN-ReLU then cuDNN).
stage bench_bn_relu_conv 55 $PY -m pytest benchmarks/test_bn_relu_conv.py "${BENCH[@]}" \
    -k "N64 and bfloat16 and channels_last and not compile and (densenet121 or 3x3s2 or 1x1s2)" \
    --benchmark-json "$OUT/bn_relu_conv.json"
# Measured against the speed-of-light bound of each case (bytes at HBM bandwidth, FLOPs at the bf16 peak).
stage measured_vs_estimated 10 $PY -m benchmarks.measured_vs_estimated "$OUT/bn_relu_conv.json" \
    --json "$OUT/measured_vs_estimated.json"
# ResNet-50 against torchvision and the pre-activation ResNetV2-50 against timm, one process.
stage bench_resnet50 45 $PY -m pytest benchmarks/test_training_step.py "${BENCH[@]}" \
    -k "(resnet50-N64 or resnetv2_50-N64) and not compile" --benchmark-json "$OUT/resnet50_step.json"
# DenseNet-121's three CUDA paths (fused Triton, fastres._C's kernels + cuDNN, naive) and checkpointing.
stage bench_densenet121 40 $PY -m pytest benchmarks/test_densenet.py "${BENCH[@]}" \
    -k "densenet121 and bfloat16" --benchmark-json "$OUT/densenet121_step.json"
for f in "$OUT"/add_relu.json "$OUT"/batch_norm.json "$OUT"/bn_relu_conv.json "$OUT"/resnet50_step.json \
        "$OUT"/densenet121_step.json; do
    # One folder per suite: each report writes its own report.md and plots.
    [ -s "$f" ] && $PY benchmarks/report.py "$f" --out "$OUT/report-$(basename "$f" .json)" >> "$OUT/report.log" 2>&1
done

{
    echo "{"
    first=1
    for k in "${!STATUS[@]}"; do
        [ $first -eq 1 ] || echo ","
        first=0
        printf '  "%s": "%s"' "$k" "${STATUS[$k]}"
    done
    echo ""
    echo "}"
} > "$OUT/status.json"
cat "$OUT/status.json"
