#!/usr/bin/env bash
# The one command a session with a lent GPU runs (`make gpu-check OUT=DIR`, or `bash scripts/gpu_check.sh DIR`):
#   1. builds the kernel libraries (weightkit/lib/) for this GPU's arch (in place, MAX_JOBS = cores),
#   2. prints `weightkit info`,
#   3. runs the whole test-suite on this machine (every test on cpu and cuda) with pytest -n 14 (TEST_WORKERS), under
#      a time budget (the suite took 108 s with 14 workers on an H200 machine's 16 cores, 2026-11-26),
#   4. runs bench/gpu_report.py (the issues' tables: kernels vs the baselines a GPU user has, copy bandwidth, the
#      Triton autotuner's choices) and the pytest-benchmark suites, each under a time budget,
#   5. optionally the training job on a >= 300M-parameter model (STAGES=...,train).
# Logs and JSON go to DIR (at most 8 files: summary.txt, build.log, tests.log, gpu-report.{log,json}, bench.{log,json},
# train.log; tests.xml too with JUNIT=1); benchmark JSON also to bench/results/<gpu>-<date>-<suite>.json.
# DIR/summary.txt is the short version. Missing bitsandbytes / galore-torch / q-galore-torch (no network on the GPU machines) are taken
# from ./.gpu-site when it exists (../shared/device/site-packages.sh .gpu-site makes it).
# Budgets (seconds, env): TEST_BUDGET=140 REPORT_BUDGET=140 BENCH_BUDGET=60 TRAIN_BUDGET=130. STAGES picks stages
# (default build,info,test,report,train; add bench for the pytest-benchmark suites). REPORT_ARGS (default: per-section
# budgets), TRAIN_ARGS (default: the 350m model, 10 steps, six methods, randomized SVD, staggered refreshes), QUANT_PEERS (default 0 here: the
# bitsandbytes/tinygemm rows were measured on 2026-11-26; QUANT_PEERS=1 adds them). The defaults are the call that
# fits one device call: about 450 s on an H200 (build 40, tests 110-140, report 140, train 130); give it timeout_s 520.
# WHEEL=dist/weightkit-...-manylinux_*.whl takes the kernel libraries from that wheel instead of building them here
# (checks that one build's CUDA library runs under this machine's torch; carry dist/ with the call).
# Exit status: non-zero if the build or any test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-check-out}
mkdir -p "$OUT_DIR" bench/results
OUT_DIR=$(cd "$OUT_DIR" && pwd)
STAGES=${STAGES:-build,info,test,report,train}
export QUANT_PEERS=${QUANT_PEERS:-0}
REPORT_ARGS=${REPORT_ARGS:---section-budget ceilings=8,host=12,kernels=30,quant=45,memoryformer=20,dictionary=12,galore=15}
TRAIN_ARGS=${TRAIN_ARGS:---model-size 350m --steps 10 --svd randomized --stagger-refresh --methods adamw,galore,galore-layerwise,galore-torch,qgalore,qgalore-layerwise --eval-every 5}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .gpu-site ]; then export PYTHONPATH="$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
status=0
t_start=$(date +%s)
stamp() { echo "[gpu-check +$(( $(date +%s) - t_start ))s] $*" | tee -a "$OUT_DIR/summary.txt"; }

stamp "start: $(date -u +%FT%TZ) stages=$STAGES"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1 | tee -a "$OUT_DIR/summary.txt"
$PY -c "import torch,triton,sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT_DIR/summary.txt"

tag=$($PY -c "from weightkit.benchreport import device_tag; print(device_tag())")

if [ -n "${WHEEL:-}" ]; then
  # the kernel libraries of a wheel built elsewhere (make wheel-cuda: dist/*.whl, carried), unchanged: does that one
  # build's CUDA library load and pass the suite under this machine's torch? (replaces the build stage)
  stamp "kernel libraries from $WHEEL (no build)"
  mkdir -p weightkit/lib && rm -f weightkit/lib/*.so
  if $PY -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); names = [n for n in z.namelist() if n.startswith('weightkit/lib/') and n.endswith('.so')]; [open('weightkit/lib/' + n.split('/')[-1], 'wb').write(z.read(n)) for n in names]; print(' '.join(names))" "$WHEEL" 2>&1 | tee -a "$OUT_DIR/summary.txt"; then
    STAGES=${STAGES//build/}
  else
    status=1; stamp "could not unpack $WHEEL"
  fi
fi

if has build; then
  arch=$($PY -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
  stamp "build for sm_${arch/./}"
  if MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST="$arch" $PY setup.py -q build_ext --inplace >"$OUT_DIR/build.log" 2>&1; then
    stamp "build ok"
  else
    status=1; stamp "BUILD FAILED (tail of build.log:)"; tail -30 "$OUT_DIR/build.log" | tee -a "$OUT_DIR/summary.txt"
  fi
fi

if has info; then
  $PY -m weightkit info 2>&1 | tee -a "$OUT_DIR/summary.txt"
fi

if has test; then
  stamp "tests: pytest -n ${TEST_WORKERS:-14}, budget ${TEST_BUDGET:-140}s"
  # 2 BLAS threads per worker, as on CI's 2 cores: workers x all cores each oversubscribe the CPU tests
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout --signal=INT --kill-after=20 "${TEST_BUDGET:-140}" \
    $PY -m pytest -p no:cacheprovider -n "${TEST_WORKERS:-14}" -v -rfE \
    --timeout=170 --durations=25 ${JUNIT:+--junitxml="$OUT_DIR/tests.xml"} ${TEST_ARGS:-tests} >"$OUT_DIR/tests.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  stamp "tests exit $rc (124/130 = budget hit); result lines:"
  grep -E "^(FAILED|ERROR) " "$OUT_DIR/tests.log" | cut -c1-240 | head -60 | tee -a "$OUT_DIR/summary.txt"
  grep -E "passed|failed|error" "$OUT_DIR/tests.log" | tail -2 | tee -a "$OUT_DIR/summary.txt"
  if [ $rc -ne 0 ]; then  # per-file counts, to see what a budget cut left unrun
    grep -oE "(PASSED|FAILED|ERROR|SKIPPED) tests/[^:]+" "$OUT_DIR/tests.log" | sort | uniq -c | sort -k2 | tee -a "$OUT_DIR/summary.txt"
  fi
fi

if has report; then
  stamp "gpu_report: budget ${REPORT_BUDGET:-140}s"
  timeout --kill-after=10 $(( ${REPORT_BUDGET:-140} + 40 )) $PY -m bench.gpu_report --budget "${REPORT_BUDGET:-140}" \
    --out "$OUT_DIR/gpu-report.json" ${REPORT_ARGS:-} >"$OUT_DIR/gpu-report.log" 2>&1
  stamp "gpu_report exit $?"
  [ -f "$OUT_DIR/gpu-report.json" ] && cp "$OUT_DIR/gpu-report.json" "bench/results/${tag}-$(date +%F)-gpu-report.json"
  grep -E "^  |^\[" "$OUT_DIR/gpu-report.log" | cut -c1-220 >>"$OUT_DIR/summary.txt"
fi

if has bench; then
  stamp "pytest-benchmark suites: budget ${BENCH_BUDGET:-60}s"
  timeout --signal=INT --kill-after=15 "${BENCH_BUDGET:-60}" $PY -m pytest -q -p no:cacheprovider ${BENCH_ARGS:-bench} \
    --benchmark-json "$OUT_DIR/bench.json" --benchmark-max-time=0.05 --benchmark-min-rounds=3 \
    --benchmark-columns=min,median,rounds >"$OUT_DIR/bench.log" 2>&1
  stamp "bench exit $?"
  [ -f "$OUT_DIR/bench.json" ] && cp "$OUT_DIR/bench.json" "bench/results/${tag}-$(date +%F)-bench.json"
fi

if has train; then
  stamp "train: budget ${TRAIN_BUDGET:-130}s: ${TRAIN_ARGS:-}"
  mkdir -p "$OUT_DIR/train"
  timeout --kill-after=15 "${TRAIN_BUDGET:-130}" $PY -m weightkit train --device cuda --out-dir "$OUT_DIR/train" \
    ${TRAIN_ARGS:-} >"$OUT_DIR/train.log" 2>&1
  stamp "train exit $?"
  tail -25 "$OUT_DIR/train.log" | tee -a "$OUT_DIR/summary.txt"
  for f in "$OUT_DIR"/train/train-*; do [ -f "$f" ] && cp "$f" "bench/results/${tag}-$(basename "$f")"; done
fi

stamp "done, status $status"
exit $status
