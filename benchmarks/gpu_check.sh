#!/usr/bin/env bash
# One run on a lent GPU machine: build, GPU tests, the key benchmarks, JSON and a report.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Sized for 8 minutes on an H100 with cold caches (Triton, cuDNN and torch.compile all
# start empty): each stage has its own time limit, and a stage that fails or runs out
# of time is recorded in OUTDIR/status.json while the others still run.
#
# Included: the tests on CUDA; add_relu at ResNet-50 batch 64 (bf16 channels_last and
# fp32 NCHW, with the copy-bandwidth ceiling); BN-ReLU / BN-add-ReLU at ResNet-50's
# shapes, batch 64, bf16 channels_last; a ResNet-50 bf16 channels_last training step at
# batch 64; DenseNet-121 at batch 64, 224x224, bf16. Left out (run the suites for them):
# torch.compile in the training steps (its cold compile alone is minutes), batch 256, float32
# batch norm, NCHW batch norm, ResNet-50 batch 128, DenseNet-BC,
# the blocks suite, torch.compile's DenseNet and every CPU case.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$OUT"
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

stage install 120 env FASTRES_CUDA=1 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e .
stage env 30 $PY -c "
import json, sys, torch, triton, fastres, fastres.functional as F
p = torch.cuda.get_device_properties(0)
json.dump({'device': torch.cuda.get_device_name(), 'sms': p.multi_processor_count,
           'memory_gb': round(p.total_memory / 2**30, 1), 'torch': torch.__version__, 'cuda': torch.version.cuda,
           'triton': triton.__version__, 'python': sys.version.split()[0], 'fastres': fastres.__version__,
           'extension': F.extension_available()}, open('$OUT/env.json', 'w'), indent=1)
print(open('$OUT/env.json').read())"
# The GPU paths first (kernels, then blocks and models); the CPU-only checks (sm_90 static
# compile, the emulated CUDA kernels) already ran where there was no GPU.
stage tests 120 $PY -m pytest -q -p no:cacheprovider -k "not emulated" --junitxml="$OUT/tests.xml" \
    tests/test_ext.py tests/test_add_relu.py tests/test_batch_norm.py tests/test_compile.py \
    tests/test_densenet.py tests/test_resnet.py tests/test_convert.py tests/test_bad_input.py

BENCH=(-p no:cacheprovider --benchmark-only -q)
stage bench_add_relu 45 $PY -m pytest benchmarks/test_add_relu.py "${BENCH[@]}" \
    -k "N64 and ((bfloat16 and channels_last) or (float32 and nchw)) and (fastres or eager or copy) and not compile" \
    --benchmark-json "$OUT/add_relu.json"
stage bench_batch_norm 60 $PY -m pytest benchmarks/test_batch_norm.py "${BENCH[@]}" \
    -k "N64 and bfloat16 and channels_last and not compile" --benchmark-json "$OUT/batch_norm.json"
stage bench_resnet50 70 $PY -m pytest benchmarks/test_training_step.py "${BENCH[@]}" \
    -k "resnet50 and N64 and not compile" --benchmark-json "$OUT/resnet50_step.json"
stage bench_densenet121 50 $PY -m pytest benchmarks/test_densenet.py "${BENCH[@]}" \
    -k "densenet121 and bfloat16" --benchmark-json "$OUT/densenet121_step.json"
for f in "$OUT"/add_relu.json "$OUT"/batch_norm.json "$OUT"/resnet50_step.json "$OUT"/densenet121_step.json; do
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
