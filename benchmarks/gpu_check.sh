#!/usr/bin/env bash
# The whole GPU check in one call (issue 19), sized for ~8 minutes of a fresh GPU machine:
# sections, each in its own time limit so one failure does not stop the rest, progress with UTC times:
#   facts     GPU, driver, torch, triton, diffusers versions; carried wheels installed (.whl/)
#   precompile (background) warms torch.compile caches for diffusers reduce-overhead/max-autotune
#   accuracy  PSNR >= 40 dB against fp32 on the taef2 weights, every reduced-precision path and kernel
#   nan       NaN latent / out-of-range image on the GPU -> the one-line TaesdError
#   tests     tests/test_cuda_path.py and tests/test_cuda_kernels.py on the GPU
#   kernels   per-layer A/B: cuDNN vs sub-pixel vs Triton (benchmarks/bench_kernels.py)
#   bench     the table: taesd and its kernel variants, diffusers eager / compiled, pipeline drop-in,
#             bounded 1024² encode, host syncs per call (benchmarks/bench_gpu.py, separate processes)
# The report goes to $OUT/GPU.md (else benchmarks/GPU.md) with every log in $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_check.sh --prepare     # here first: taef2 weights -> .weights/, wheels -> .whl/
#   bash benchmarks/gpu_check.sh               # on the GPU machine (carry .weights and .whl)
#   bash benchmarks/gpu_check.sh --cpu-smoke   # every section on the CPU, tiny shapes (minutes)
#
# Options: --budget-s N (whole run, default 465), --weights DIR (default $TAESD_WEIGHTS, else .weights),
# --output FILE (default $OUT/GPU.md, else benchmarks/GPU.md; smoke: $TMPDIR/GPU-cpu-smoke.md),
# --with-compile (the smoke run compiles too; slow on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu budget=465 output="" weights="${TAESD_WEIGHTS:-}" with_compile=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) mode=smoke ;;
    --prepare) mode=prepare ;;
    --budget-s) budget="$2"; shift ;;
    --weights) weights="$2"; shift ;;
    --output) output="$2"; shift ;;
    --with-compile) with_compile=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -z "$weights" ] && [ -d .weights ] && weights=.weights
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }
stamp() { echo "[$(date -u +%H:%M:%S) +$(elapsed)s] $*"; }

if [ "$mode" = prepare ]; then
  # Host side: the GPU machine has no internet and gets only the repo (plus carried ignored paths).
  src="${weights:-/work/shared/weights}"
  mkdir -p .weights
  exclude="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qx '/.weights/' "$exclude" 2>/dev/null || echo /.weights/ >> "$exclude"
  cp "$src"/taef2_encoder.pth "$src"/taef2_decoder.pth .weights/ || exit 2
  bash scripts/gpu_wheels.sh || exit 2
  du -sh .weights .whl
  echo "prepared: run 'bash benchmarks/gpu_check.sh' on the GPU machine with carry [.weights, .whl]"
  exit 0
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/taesd-inductor-cache}"
logdir=$(mktemp -d)
echo "| section | result | seconds |" > "$logdir/sections.md"
echo "| --- | --- | --- |" >> "$logdir/sections.md"
status=0

# section NAME LIMIT CMD...: run CMD within LIMIT seconds, log to $logdir/NAME.log, record the result.
section() {
  local name=$1 limit=$2 t0 rc what
  shift 2
  t0=$(date +%s)
  if [ "$limit" -lt 5 ]; then
    stamp "== $name: skipped (no time left)"
    echo "| $name | skipped (no time left) | 0 |" >> "$logdir/sections.md"
    return
  fi
  stamp "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$logdir/$name.log" 2>&1
  rc=$?
  tail -n 30 "$logdir/$name.log"
  case $rc in
    0) what=ok ;;
    124|137) what="TIMED OUT after ${limit}s"; [ "$mode" = gpu ] && status=1 ;;  # a slow CPU is no failure
    *) what="exit $rc"; status=1 ;;
  esac
  echo "| $name | $what | $(( $(date +%s) - t0 )) |" >> "$logdir/sections.md"
  stamp "== $name: $what"
}
left() { echo $(( budget - $(elapsed) - ${1:-0} )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

if [ "$mode" = smoke ]; then
  dev=cpu small=--small
  output=${output:-${TMPDIR:-/tmp}/GPU-cpu-smoke.md}
  "$PY" -c "import triton" 2>/dev/null && export TRITON_INTERPRET=1  # Triton kernels in its interpreter
  acc_size=32 calls="--calls 1 --trials 1" rounds="--rounds 1 --per-turn 1 --warmup 1 --bound 1MiB"
  [ "$budget" = 465 ] && budget=270
  lim_acc=60 lim_nan=20 lim_tests=25 lim_kernels=25
else
  dev=cuda small=""
  output=${output:-${OUT:+$OUT/GPU.md}}
  output=${output:-benchmarks/GPU.md}
  acc_size=512 calls="--sweep" rounds=""
  lim_acc=90 lim_nan=45 lim_tests=75 lim_kernels=60
fi

# ---- facts and carried wheels
{
  stamp "gpu_check.sh $mode, budget ${budget}s"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import diffusers" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/taesd-site \
      .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/taesd-site" && echo "installed carried wheels: $(ls .whl)"
  fi
  "$PY" - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "diffusers", "transformers", "onnxruntime", "skimage"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING:", type(e).__name__, e)
PYEOF
} 2>&1 | tee "$logdir/facts.log"
[ -d /tmp/taesd-site ] && export PYTHONPATH="$PYTHONPATH:/tmp/taesd-site"

# ---- torch.compile warm-up in the background (its caches make the bench's own compiles hits)
compile_names=""
if [ "$mode" = gpu ] || [ "$with_compile" = 1 ]; then
  pre_budget=$(min 150 $(( budget / 3 )))
  stamp "== precompile (background, ${pre_budget}s)"
  timeout --kill-after=10 $(( pre_budget + 40 )) "$PY" benchmarks/bench_gpu.py precompile --device $dev $small \
    --budget-s "$pre_budget" -o "$logdir/precompiled.json" > "$logdir/precompile.log" 2>&1 &
  pre_pid=$!
else
  echo "[]" > "$logdir/precompiled.json"
  # the Triton rows would run in its interpreter here: slow; the kernels section and tests cover them
  compile_names="--competitors taesd taesd-subpixel diffusers pipe-taesd pipe-tiny taesd-bounded plain"
  pre_pid=""
fi

# ---- accuracy, bad input, tests (none of them timed, so they overlap the warm-up)
if [ -n "$weights" ]; then
  section accuracy "$(min $lim_acc "$(left 150)")" "$PY" benchmarks/bench_gpu.py accuracy --device $dev \
    --weights "$weights" --size $acc_size -o "$logdir/accuracy.md"
else
  echo "accuracy: no taef2 weights (run --prepare here and carry .weights)" | tee "$logdir/accuracy.md"; status=1
fi
section nan "$(min $lim_nan "$(left 130)")" "$PY" benchmarks/bench_gpu.py nan --device $dev -o "$logdir/nan.md"
if [ "$mode" = gpu ]; then
  section tests "$(min $lim_tests "$(left 120)")" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_path.py \
    tests/test_cuda_kernels.py -k "not cpu_smoke"
else
  section tests "$(min $lim_tests "$(left 120)")" "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_cuda_kernels.py -k "transposed or available"
fi
grep -E "passed|failed|error" "$logdir/tests.log" 2>/dev/null | tail -n 1 > "$logdir/tests.md"

# ---- timed sections: wait for the warm-up first (its GPU work would disturb the timings)
if [ -n "$pre_pid" ]; then
  stamp "waiting for precompile"
  wait "$pre_pid"
  tail -n 12 "$logdir/precompile.log"
  stamp "precompiled: $(cat "$logdir/precompiled.json" 2>/dev/null)"
fi
section kernels "$(min $lim_kernels "$(left 90)")" "$PY" benchmarks/bench_kernels.py --device $dev $small $calls \
  --budget-s $(( lim_kernels - 15 )) -o "$logdir/kernels.md"
bench_left=$(left 20)
section bench "$bench_left" "$PY" benchmarks/bench_gpu.py --device $dev $small $rounds $compile_names \
  --budget-s "$(( bench_left > 50 ? bench_left - 40 : 10 ))" --config-reserve-s 12 --compile-reserve-s 30 \
  --precompiled "$logdir/precompiled.json" --accuracy "$logdir/accuracy.md" \
  --extra "$logdir/kernels.md" --extra "$logdir/nan.md" -o "$output"

# ---- the report: the bench's (fragments included), else the fragments alone; then the sections
if [ ! -s "$output" ]; then
  mkdir -p "$(dirname "$output")"
  { echo "# TAESD GPU check (the bench did not write its table: see the log)"; echo
    cat "$logdir/facts.log"; echo; echo "## Accuracy"; echo; cat "$logdir/accuracy.md" 2>/dev/null; echo
    cat "$logdir/kernels.md" "$logdir/nan.md" 2>/dev/null; } > "$output"
fi
{ echo; echo "## Sections (gpu_check.sh, $mode, $(elapsed) s)"; echo; cat "$logdir/sections.md"; echo
  echo "Tests: $(cat "$logdir/tests.md" 2>/dev/null)"; echo "Precompiled: $(cat "$logdir/precompiled.json")"; } >> "$output"
stamp "gpu check: exit $status, report $output"
if [ -n "${OUT:-}" ]; then
  [ "$output" != "$OUT/GPU.md" ] && cp "$output" "$OUT/GPU.md"
  for f in facts precompile accuracy nan tests kernels bench; do
    [ -f "$logdir/$f.log" ] && { echo "===== $f"; cat "$logdir/$f.log"; }
  done > "$OUT/gpu_check.log" 2>&1
  cp "$logdir/bench.log" "$OUT/bench.log" 2>/dev/null
fi
exit $status
