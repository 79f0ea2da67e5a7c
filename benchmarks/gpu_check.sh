#!/usr/bin/env bash
# The whole GPU check in one call: install carried wheels, run the CUDA tests, check accuracy
# (PSNR >= 40 dB against fp32 on the taef2 weights), run the GPU table, write benchmarks/GPU.md
# (and copy it with the logs to $OUT when that is set). Sized for ~8 minutes of a fresh GPU machine.
#
#   bash benchmarks/gpu_check.sh --prepare     # here, before the GPU call: weights -> .weights/, wheels -> .whl/
#   bash benchmarks/gpu_check.sh               # on the GPU machine (carry .weights and .whl)
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same harness on the CPU, tiny sizes (tests/test_cuda_path.py)
#
# Options: --budget-s N (seconds for the table, default 330), --weights DIR (default $TAESD_WEIGHTS,
# else .weights), --output FILE (default benchmarks/GPU.md; the smoke run: $TMPDIR/GPU-cpu-smoke.md).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu budget=330 output="" weights="${TAESD_WEIGHTS:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) mode=smoke ;;
    --prepare) mode=prepare ;;
    --budget-s) budget="$2"; shift ;;
    --weights) weights="$2"; shift ;;
    --output) output="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -z "$weights" ] && [ -d .weights ] && weights=.weights
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }

if [ "$mode" = prepare ]; then
  # Host side: the GPU machine has no internet and gets only the repo (plus carried ignored paths).
  src="${weights:-/work/shared/weights}"
  mkdir -p .weights .whl
  grep -qx '/.weights/' .git/info/exclude 2>/dev/null || echo /.weights/ >> "$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
  cp "$src"/taef2_encoder.pth "$src"/taef2_decoder.pth .weights/ || exit 2
  # diffusers is not on the GPU image (torch, onnxruntime, scikit-image are); pure-Python wheels.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==0.42.1" "importlib_metadata==10.2.0" || exit 2
  du -sh .weights .whl
  echo "prepared: run 'bash benchmarks/gpu_check.sh' on the GPU machine with carry [.weights, .whl]"
  exit 0
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/taesd-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/taesd-site"
fi
logdir=$(mktemp -d)
status=0

if [ "$mode" = smoke ]; then
  output=${output:-${TMPDIR:-/tmp}/GPU-cpu-smoke.md}
  acc="$logdir/accuracy.md"
  if [ -n "$weights" ]; then
    "$PY" benchmarks/bench_gpu.py accuracy --device cpu --weights "$weights" --size 32 -o "$acc" || status=1
  fi
  "$PY" benchmarks/bench_gpu.py --device cpu --sizes 32 --batches 1 2 --rounds 1 --per-turn 2 --warmup 2 \
    --competitors taesd taesd-eager taesd-bounded plain --bound 1MiB --budget-s 30 --config-reserve-s 5 \
    ${weights:+--accuracy "$acc"} -o "$output" || status=1
  echo "cpu smoke: $(elapsed) s, exit $status"
  exit $status
fi

# ---- the GPU run
{
  nvidia-smi -L || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  "$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" || echo "diffusers: not installed (carry .whl)"
} 2>&1 | tee "$logdir/facts.log"
# 1. the CUDA tests (the GPU-only ones run here; ~1 min at most)
timeout 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_path.py -k "not cpu_smoke" 2>&1 \
  | tee "$logdir/tests.log" | tail -n 15 || status=1
# 2. accuracy on the real weights and photos
if [ -n "$weights" ]; then
  timeout 150 "$PY" benchmarks/bench_gpu.py accuracy --device cuda --weights "$weights" --size 512 \
    -o "$logdir/accuracy.md" 2>&1 | tee "$logdir/accuracy.log" || status=1
else
  echo "accuracy: no weights (run --prepare here and carry .weights)" | tee "$logdir/accuracy.md"; status=1
fi
# 3. the table, in what is left of the budget (the report is rewritten after every configuration)
left=$(( budget - $(elapsed) )); [ "$left" -lt 60 ] && left=60
timeout $(( left + 90 )) "$PY" benchmarks/bench_gpu.py --device cuda --budget-s "$left" \
  --accuracy "$logdir/accuracy.md" -o "${output:-benchmarks/GPU.md}" 2>&1 | tee "$logdir/bench.log" || status=1
echo "gpu check: $(elapsed) s, exit $status" | tee -a "$logdir/bench.log"
if [ -n "${OUT:-}" ]; then
  cp "${output:-benchmarks/GPU.md}" "$OUT/" 2>/dev/null
  cat "$logdir"/facts.log "$logdir"/tests.log "$logdir"/accuracy.log "$logdir"/bench.log > "$OUT/gpu_check.log" 2>/dev/null
fi
exit $status
