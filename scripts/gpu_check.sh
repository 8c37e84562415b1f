#!/usr/bin/env bash
# The one command a session with a lent GPU runs: `make gpu-check OUT=DIR` (or `bash scripts/gpu_check.sh DIR`).
# On the device machine `make gpu-check` writes to $OUT, which the device tool brings back.
#
# Stages, in the order of their value; each one under a hard wall-clock limit (seconds, env), after which it is
# stopped (SIGINT / SIGTERM, SIGKILL a few seconds later) and what it wrote so far stays in DIR:
#   probe   20  python, torch, the GPU, which optional packages import (always runs; not a stage to pick)
#   build   70  BUILD_BUDGET: the kernel libraries (weightkit/lib/) for this GPU's arch, in place (MAX_JOBS = cores);
#               measured 37-43 s on an H200 machine (2026-11-26)
#   info    10  INFO_BUDGET: `weightkit info`
#   test   140  TEST_BUDGET: the CUDA tests: pytest -n TEST_WORKERS=14 -k TEST_K="(cuda or tuned_path) and not
#               cudasim" (every test whose id, file or marker names cuda, but for tests/test_cudasim.py; TEST_K= runs
#               the whole suite, TEST_PATHS picks files); tests that need bitsandbytes or galore-torch skip without
#               them; each worker's first Triton compiles fall here
#   report 110  REPORT_BUDGET: bench/gpu_report.py (its own budget is this less 20 s for start-up and the last
#               write; each section gets its share, Triton autotuning included; the JSON is rewritten after every row)
#   train   50  TRAIN_BUDGET: `weightkit train` on the 350m model, 6 steps, for the methods of TRAIN_METHODS
#               (default adamw,galore,qgalore) that can run here: qgalore* need bitsandbytes, galore-torch its package
#   ----------
#   sum    400  s = 6 min 40 s < 7 min: the whole call fits, leaving 20 s for the shell itself, and a second targeted
#               call fits in the same 15 minutes of device time (machine start ~1.5 min each).
# A subset: STAGES=report REPORT_SECTIONS=quant make gpu-check  (report budget 80 s when REPORT_SECTIONS is given;
# the build stage is added when the CUDA kernel library is missing here, as on a fresh machine: 20 + 70 + 80 = 170 s
# at most, about 2 minutes in practice).
# Optional stage `bench` (STAGES=...,bench; BENCH_BUDGET=60): the pytest-benchmark suites.
#
# DIR/summary.txt says at its top the status, what was skipped and why, and each stage's time against its limit;
# it is rewritten after each stage. DIR holds at most 8 files by default (the device tool brings back 8): summary.txt,
# build.log, tests.log, gpu-report.{json,log}, train.log, train/train-*.{json,png}; JUNIT=1 adds tests.xml and the
# bench stage bench.{log,json}. The report and train JSON are also copied to bench/results/ (RESULTS_DIR).
# Kernel libraries built on a machine without a GPU (`bash scripts/prebuild_gpu.sh`: ./.gpu-prebuilt, for Python 3.12
# and sm_90; name it in the call's carry) replace the build stage when they were built from this checkout's sources
# and load and run on the GPU (else the build runs, and summary.txt says why): 37-43 s less of each fresh machine;
# the build's limit less 10 s then goes to the report stage, unless REPORT_BUDGET is given.
# Missing bitsandbytes / galore-torch / q-galore-torch (no network on the GPU machines) are taken from ./.gpu-site
# when it exists (`../shared/device/site-packages.sh .gpu-site` makes it; name .gpu-site in the call's carry).
# WHEEL=dist/weightkit-...-manylinux_*.whl takes the kernel libraries from that wheel instead of building them here
# (checks that one build's CUDA library runs under this machine's torch; carry dist/ with the call).
# Opt-in report sections for a second, targeted call (each measures one issue's table; give it the report budget):
#   STAGES=report REPORT_SECTIONS=galore_issue25 REPORT_BUDGET=170   (#25: GaLore steps, refreshes, syncs)
#   STAGES=report REPORT_SECTIONS=qgalore_fused REPORT_BUDGET=120    (#24: the fused Q-GaLore write-back and moments)
#   STAGES=report REPORT_SECTIONS=compress REPORT_BUDGET=120         (#26: the compressor on CUDA; its ">= 20x the
#       2-core CPU" ratio comes from the CPU run recorded in bench/results/cpu-*-compress-layer.json; the MiniLM row
#       needs the model's weights, which the GPU image lacks: `make gpu-minilm` writes a float16 copy, 45 MB, to
#       ./.gpu-minilm; carry it (with the 64 MiB a call carries, leave .gpu-site and .gpu-prebuilt out of that call);
#       its CPU reference is the recorded run of the same weights, bench/results/cpu-*-compress-minilm-<hash>.json)
# and train calls for the end-to-end rows (the default train stage runs adamw,galore,qgalore for 6 steps):
#   STAGES=train TRAIN_METHODS=adamw,galore,galore-layerwise,qgalore-layerwise TRAIN_BUDGET=240 \
#     TRAIN_ARGS="--model-size 350m --steps 20 --svd randomized --stagger-refresh --eval-every 10 --tf32"
#       (#24/#25: 309M, 8 x 512: step time and peak of Q-GaLore / GaLore layer-wise against fused AdamW; --tf32:
#       the projections on TF32 tensor cores, as most GPU users train; drop it for torch's strict float32)
#   STAGES=train TRAIN_METHODS=qgalore-layerwise,adamw TRAIN_BUDGET=420 \
#     TRAIN_ARGS="--model-size 7b --checkpointing --dtype bfloat16 --steps 8 --svd randomized --eval-every 4 \
#       --tf32 --lowrank-precision bf16x3"
#       (#24's 7B row, 16 x 256, rank 1024, bf16 parameters as in the Q-GaLore paper's 7B run; AdamW's 7B state,
#       bf16 too, fits an H100. At rank 1024 the projections and write-backs are ~26 TFLOP a step: ~0.6 s in
#       strict float32, hence tensor cores: the bf16 gradients' projections on bf16 ones with exact products
#       (int4_matmul's out_dtype=float32 on triton: one product on the right, three on the left), --tf32 for the
#       float32 rest, and bf16x3 for the write-back (float32 accuracy from three bf16 products, half tf32x3's
#       tensor-core work); should the test stage's test_compiled_write_back_on_cuda fail for bf16x3, run it
#       with --lowrank-precision tf32x3)
# A second call may join a report section and a train run (stages run in the order above, report before train; the
# report's JSON is rewritten after every row and the training results after every method, so a cut keeps both).
# With ~380 s of device time left after the first call (the device tool's status, budget_left_s), three target rows
# in one call (#25's host syncs, the 350m step and peak rows of #24 and #25; timeout_s ~330):
#   STAGES=report,train REPORT_SECTIONS=galore_issue25 REPORT_BUDGET=150 \
#     TRAIN_METHODS=adamw,galore-layerwise,qgalore-layerwise TRAIN_BUDGET=140 \
#     TRAIN_ARGS="--model-size 350m --steps 16 --svd randomized --stagger-refresh --eval-every 8 --tf32"
#   (galore_issue25 measures its syncs rows second, after a smoke row; its projection rows, last, may be cut)
# Other knobs: REPORT_SECTIONS (default ceilings,quant,kernels,galore,memoryformer,dictionary,auto,host),
# REPORT_SECTION_BUDGETS (e.g. quant=40: seconds outright), QUANT_PEERS (default 0: the bitsandbytes/tinygemm rows
# were measured on 2026-11-26), TRAIN_ARGS, TEST_ARGS (extra pytest arguments), TEST_COMPILE_THREADS (Triton compile
# threads per test worker, default 1; the report and train compile a tuner's configs on all cores, at most 16:
# WEIGHTKIT_COMPILE_THREADS), PYTHON.
# Exit status: 0 when every stage asked for ran and passed; 1 when the build, a test or a stage failed or hit its
# limit; 2 when there is no CUDA device (the CUDA stages are skipped, summary.txt says why).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-check-out}
RESULTS_DIR=${RESULTS_DIR:-bench/results}  # where the report and train JSON are copied too
mkdir -p "$OUT_DIR" "$RESULTS_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
BODY="$WORK/body"
: >"$BODY"
rm -f "$OUT_DIR/summary.txt"

PY=${PYTHON:-python3}
STAGES=${STAGES:-build,info,test,report,train}
PROBE_BUDGET=${PROBE_BUDGET:-20}
BUILD_BUDGET=${BUILD_BUDGET:-70}
INFO_BUDGET=${INFO_BUDGET:-10}
TEST_BUDGET=${TEST_BUDGET:-140}
TRAIN_BUDGET=${TRAIN_BUDGET:-50}
BENCH_BUDGET=${BENCH_BUDGET:-60}
REPORT_BUDGET_GIVEN=${REPORT_BUDGET:-}
if [ -n "${REPORT_SECTIONS:-}" ]; then
  REPORT_BUDGET=${REPORT_BUDGET:-80}
else
  REPORT_SECTIONS=ceilings,quant,kernels,galore,memoryformer,dictionary,auto,host
  REPORT_BUDGET=${REPORT_BUDGET:-110}
fi
TEST_WORKERS=${TEST_WORKERS:-14}
# tuned_path: the dictionary kernels' autotuned launch, compiled on a GPU; not cudasim: tests/test_cudasim.py runs the
# CUDA kernels on the CPU for machines without a GPU (2-3 minutes, nothing the GPU's own tests do not show better)
TEST_K=${TEST_K-(cuda or tuned_path) and not cudasim}
TRAIN_METHODS=${TRAIN_METHODS:-adamw,galore,qgalore}
TRAIN_ARGS=${TRAIN_ARGS:---model-size 350m --steps 6 --svd randomized --stagger-refresh --eval-every 3}
export QUANT_PEERS=${QUANT_PEERS:-0}
export PYTHONUNBUFFERED=1
if [ -d .gpu-site ]; then export PYTHONPATH="$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"; fi
# the MiniLM weights of the compress section (a float16 copy, `make gpu-minilm`): the GPU image has none
if [ -f .gpu-minilm/model.safetensors ] && [ -z "${WEIGHTKIT_MINILM_PATH:-}" ]; then
  export WEIGHTKIT_MINILM_PATH="$PWD/.gpu-minilm"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status=0
no_gpu=0
t_start=$(date +%s)
SKIPS=()      # "what: why", for the top of summary.txt
RESULTS=()    # "stage  result  used / limit s  detail"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
drop_stage() { STAGES=$(echo ",$STAGES," | sed -e "s/,$1,/,/" -e 's/^,//; s/,$//'); }
elapsed() { echo $(( $(date +%s) - t_start )); }
log() { echo "[gpu-check +$(elapsed)s] $*" | tee -a "$BODY"; }
skip() { SKIPS+=("$1"); log "skipped $1"; }

write_summary() {  # header (status, skips, stages) + the log so far; rewritten after each stage
  local verdict="ok"
  [ $status -ne 0 ] && verdict="FAILED"
  [ $no_gpu -eq 1 ] && verdict="NO CUDA DEVICE: nothing was checked on a GPU"
  {
    echo "gpu-check: $verdict ($(elapsed) s${FINISHED:- so far}; stages run: $STAGES; started ${START_DATE:-})"
    echo "device: ${P_gpu:-none} ${P_arch:+(sm_${P_arch/./})}; torch ${P_torch:-?} (CUDA ${P_cuda_runtime:-none}); triton ${P_triton:--}; bitsandbytes ${P_bnb:--}; galore-torch ${P_galore_torch:--}"
    echo "skipped (what: why):"
    if [ ${#SKIPS[@]} -eq 0 ]; then echo "  nothing"; else printf '  - %s\n' "${SKIPS[@]}"; fi
    echo "stages (result, seconds used / hard limit):"
    if [ ${#RESULTS[@]} -eq 0 ]; then echo "  none finished yet"; else printf '  %s\n' "${RESULTS[@]}"; fi
    if [ -s "$WORK/targets" ]; then
      echo "the issues' targets, judged from this call's files (python -m bench.targets; met / MISSED / not measured):"
      cat "$WORK/targets"
    fi
    echo "-----------------------------------------------------------------------------------------------------------"
    cat "$BODY"
  } >"$OUT_DIR/summary.txt.tmp"
  mv "$OUT_DIR/summary.txt.tmp" "$OUT_DIR/summary.txt"
}

# limited LIMIT SIGNAL LOG CMD...: CMD with stdout+stderr to LOG, sent SIGNAL at LIMIT - grace and SIGKILL at LIMIT
# (timeout signals CMD's whole process group: pytest-xdist workers and spawned train processes too).
# Returns CMD's status; 124 or 137 when the limit stopped it.
limited() {
  local limit=$1 sig=$2 logf=$3
  shift 3
  local grace=$(( limit >= 40 ? 8 : (limit >= 6 ? 3 : 1) ))
  timeout --signal="$sig" --kill-after="$grace" "$(( limit - grace ))" "$@" >"$logf" 2>&1
}

# targets: the issues' targets judged from this call's report and training runs (bench/targets.py), for summary.txt
targets() {
  local files=()
  [ -f "$OUT_DIR/gpu-report.json" ] && files+=("$OUT_DIR/gpu-report.json")
  for f in "$OUT_DIR"/train/train-*.json; do [ -f "$f" ] && files+=("$f"); done
  [ ${#files[@]} -eq 0 ] && return 0
  timeout -k 3 15 $PY -m bench.targets --style brief --issues 24,25,26 "${files[@]}" >"$WORK/targets" 2>&1 || true
}

# result STAGE RC STARTED LIMIT [DETAIL]: record a stage's outcome (a stage stopped at its limit fails the check)
result() {
  local stage=$1 rc=$2 t0=$3 limit=$4 detail=${5:-}
  local used=$(( $(date +%s) - t0 )) what="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || { [ "$rc" -eq 130 ] && [ "$used" -ge $(( limit - 10 )) ]; }; then
    what="STOPPED AT ITS ${limit}s LIMIT (exit $rc)"; status=1
  elif [ "$rc" -ne 0 ]; then
    what="FAILED (exit $rc)"; status=1
  fi
  RESULTS+=("$(printf '%-7s %-34s %4d / %4d s  %s' "$stage" "$what" "$used" "$limit" "$detail")")
  log "$stage: $what in ${used}s${detail:+: $detail}"
  write_summary
}

START_DATE=$(date -u +%FT%TZ)
log "start: $START_DATE stages=$STAGES"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader >>"$BODY" 2>&1
else
  echo "nvidia-smi: not on the PATH" >>"$BODY"
fi

# probe: one python start that says what this machine has, as shell assignments (P_*)
PROBE='# GPU_CHECK_PROBE
import shlex
has_cuda = False
def say(key, value): print(f"P_{key}={shlex.quote(str(value))}")
try:
    import torch
    say("torch", torch.__version__); say("cuda_runtime", torch.version.cuda or "none")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        has_cuda = True
        say("cuda", 1); say("gpu", torch.cuda.get_device_name()); say("arch", f"{cap[0]}.{cap[1]}")
    else:
        say("cuda", 0)
        say("why_no_cuda", "torch.cuda.is_available() is False" + ("" if torch.version.cuda else " (a CPU-only torch)"))
except Exception as exc:
    say("cuda", 0); say("why_no_cuda", f"torch does not import: {type(exc).__name__}: {exc}")
for mod, key in (("triton", "triton"), ("bitsandbytes", "bnb"), ("galore_torch", "galore_torch")):
    try:
        say(key, getattr(__import__(mod), "__version__", "present"))
    except Exception as exc:
        say(key, ""); say(key + "_why", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else exc}")
try:
    from weightkit.benchreport import device_tag
    say("tag", device_tag())
    if has_cuda:
        from weightkit import native
        why = native.cuda_why_not(torch.device("cuda"))
        say("cudalib", "ok" if why is None else "")
        say("cudalib_why", why or "")
except Exception as exc:
    say("tag", "unknown"); say("cudalib", ""); say("cudalib_why", f"weightkit does not import: {exc}")
'
# the report's sections and the rows it did not measure, from its JSON (written as it went, so also after a kill)
REPORT_SUMMARY='import json, sys
r = json.load(open(sys.argv[1]))
def fate(name, v):
    return "%s %s (%s/%s s, %s rows)" % (name, v.get("status"), v.get("seconds", "-"), v.get("budget_s"), v.get("rows", 0))
print("sections: " + "; ".join(fate(k, v) for k, v in r.get("sections", {}).items()))
rows = r.get("rows", [])
print("complete" if r.get("complete") else "INCOMPLETE (stopped from outside)", len(rows), "rows,",
      sum("error" in x for x in rows), "errors,", len(r.get("skipped", [])), "skipped")
for s in r.get("skipped", [])[:40]:
    print("  not measured:", s[:200])
compiled = [x for x in rows if x.get("section") == "compiled"]
if compiled:
    spill = [x for x in compiled if (x.get("n_spills") or 0) > 0]
    print("compiled Triton kernels: %d, %d spill registers" % (len(compiled), len(spill)))
    for x in spill[:20]:
        print("  spills: %s warps %s %s B %s" % (x["name"], x.get("num_warps"), x["n_spills"], x.get("constexprs", "")[:120]))
'
P_cuda=0
P_why_no_cuda="the probe did not answer"
probe_out=$(timeout -k 3 "$PROBE_BUDGET" $PY -c "$PROBE" 2>"$WORK/probe.err")
rc=$?
if [ $rc -eq 0 ]; then
  eval "$probe_out"
elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  P_why_no_cuda="the probe (python, torch) did not finish within PROBE_BUDGET=${PROBE_BUDGET}s"
else
  P_why_no_cuda="the probe failed (exit $rc): $(grep -v '^ ' "$WORK/probe.err" | tail -2 | tr '\n' ' ' | cut -c1-300)"
fi
# prebuilt kernel libraries carried from a machine without a GPU (scripts/prebuild_gpu.sh): on a GPU, put in place
# when built from these sources and probed again; the build stage is dropped below if they load and run on this GPU
# (PREBUILT= ignores them)
PREBUILT=${PREBUILT-.gpu-prebuilt}
prebuilt_used=0
if [ "${P_cuda:-0}" = 1 ] && [ -n "$PREBUILT" ] && [ -f "$PREBUILT/SOURCES" ] && [ -z "${WHEEL:-}" ]; then
  want=$(bash scripts/prebuild_gpu.sh --hash)
  have=$(cat "$PREBUILT/SOURCES")
  if [ "$want" != "$have" ]; then
    SKIPS+=("the carried kernel libraries ($PREBUILT): built from other sources (hash $have, this checkout's $want): not used")
  elif mkdir -p weightkit/lib && cp "$PREBUILT"/weightkit/_C*.so weightkit/ \
       && cp "$PREBUILT/weightkit/lib/libweightkit_cuda.so" weightkit/lib/; then
    prebuilt_used=1
    log "kernel libraries from $PREBUILT (sources $have): $(head -1 "$PREBUILT/BUILT" 2>/dev/null | cut -c1-200)"
    probe_out=$(timeout -k 3 "$PROBE_BUDGET" $PY -c "$PROBE" 2>"$WORK/probe.err") && eval "$probe_out"
  else
    SKIPS+=("the carried kernel libraries ($PREBUILT): could not be put in place")
  fi
fi
P_tag=${P_tag:-unknown}
log "probe: torch ${P_torch:-?}, cuda ${P_cuda} ${P_gpu:-}, triton ${P_triton:--}, bitsandbytes ${P_bnb:--}, galore-torch ${P_galore_torch:--}"
if [ "${P_cuda:-0}" != 1 ]; then
  no_gpu=1
  for s in build test report train bench; do
    has $s && skip "$s: no CUDA device (${P_why_no_cuda:-})"
  done
  for s in build test report train bench; do drop_stage $s; done
fi
for s in build info test report train; do
  has $s || [ $no_gpu -eq 1 ] || SKIPS+=("$s: not in STAGES")
done
[ -z "${P_bnb:-}" ] && [ $no_gpu -eq 0 ] && \
  SKIPS+=("everything that needs bitsandbytes (tests skip, 8-bit report rows, qgalore training): ${P_bnb_why:-not importable}; carry it: ../shared/device/site-packages.sh .gpu-site")
write_summary

if [ $prebuilt_used -eq 1 ] && [ $no_gpu -eq 0 ]; then
  if [ "${P_cudalib:-}" = ok ]; then
    if has build; then
      drop_stage build
      SKIPS+=("build: the carried kernel libraries ($PREBUILT, built from these sources) load and run on this GPU (PREBUILT= builds them here)")
      if has report && [ -z "$REPORT_BUDGET_GIVEN" ]; then  # the build's time to the report's rows (10 s kept for the probe)
        REPORT_BUDGET=$(( REPORT_BUDGET + BUILD_BUDGET - 10 ))
        log "the build's ${BUILD_BUDGET} s less 10 go to the report: REPORT_BUDGET=${REPORT_BUDGET}"
      fi
    fi
  else
    log "the carried kernel libraries ($PREBUILT) do not run here (${P_cudalib_why:-}): building them"
  fi
fi

if [ -n "${WHEEL:-}" ] && [ $no_gpu -eq 0 ]; then
  # the kernel libraries of a wheel built elsewhere (make wheel-cuda: dist/*.whl, carried), unchanged: does that one
  # build's CUDA library load and pass the suite under this machine's torch? (replaces the build stage)
  log "kernel libraries from $WHEEL (no build)"
  mkdir -p weightkit/lib && rm -f weightkit/lib/*.so
  if $PY -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); names = [n for n in z.namelist() if n.startswith('weightkit/lib/') and n.endswith('.so')]; [open('weightkit/lib/' + n.split('/')[-1], 'wb').write(z.read(n)) for n in names]; print(' '.join(names))" "$WHEEL" >>"$BODY" 2>&1; then
    has build && SKIPS+=("build: WHEEL=$WHEEL gives the kernel libraries")
    drop_stage build
  else
    status=1; log "could not unpack $WHEEL"
  fi
elif [ $no_gpu -eq 0 ] && ! has build && [ "${P_cudalib:-}" != ok ] && { has test || has report || has train || has bench; }; then
  # a fresh machine has no kernel library: without it the cuda backend would be missing from every stage
  SKIPS+=("(build added: no usable CUDA kernel library here: ${P_cudalib_why:-not built})")
  STAGES="build,$STAGES"
fi

if has build; then
  log "build for sm_${P_arch/./} (limit ${BUILD_BUDGET}s)"
  t0=$(date +%s)
  MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST="$P_arch" limited "$BUILD_BUDGET" TERM "$OUT_DIR/build.log" \
    $PY setup.py -q build_ext --inplace
  rc=$?
  [ $rc -ne 0 ] && tail -30 "$OUT_DIR/build.log" >>"$BODY"
  result build $rc "$t0" "$BUILD_BUDGET"
fi

if has info; then
  t0=$(date +%s)
  limited "$INFO_BUDGET" TERM "$WORK/info.log" $PY -m weightkit info
  rc=$?
  cat "$WORK/info.log" >>"$BODY"
  result info $rc "$t0" "$INFO_BUDGET"
fi

if has test; then
  test_args=(-p no:cacheprovider -n "$TEST_WORKERS" -v -rfEs --timeout=90 --durations=15)
  [ -n "$TEST_K" ] && test_args+=(-k "$TEST_K")
  [ -n "${JUNIT:-}" ] && test_args+=(--junitxml="$OUT_DIR/tests.xml")
  read -r -a extra <<<"${TEST_ARGS:-}"
  read -r -a paths <<<"${TEST_PATHS:-tests}"
  log "tests (limit ${TEST_BUDGET}s): pytest $(printf '%q ' "${test_args[@]}" "${extra[@]}" "${paths[@]}")"
  t0=$(date +%s)
  # 2 BLAS threads and 1 Triton compile thread per worker: workers x all cores each would oversubscribe the CPU
  # parts of the tests (the workers already compile side by side)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WEIGHTKIT_COMPILE_THREADS=${TEST_COMPILE_THREADS:-1} \
    limited "$TEST_BUDGET" INT "$OUT_DIR/tests.log" \
    $PY -m pytest "${test_args[@]}" "${extra[@]}" "${paths[@]}"
  rc=$?
  counts=$(grep -E "^=+ .*(passed|failed|error|skipped|deselected).* in [0-9.]+s" "$OUT_DIR/tests.log" | tail -1 | tr -d '=' | sed 's/^ *//')
  grep -E "^(FAILED|ERROR) " "$OUT_DIR/tests.log" | cut -c1-240 | head -60 >>"$BODY"
  nskip=$(grep -cE "^SKIPPED \[" "$OUT_DIR/tests.log")
  if [ "$nskip" -gt 0 ]; then  # -rs: one line per reason, "SKIPPED [count] file:line: reason"
    echo "test skip reasons (count, where, why):" >>"$BODY"
    grep -E "^SKIPPED \[" "$OUT_DIR/tests.log" | sort -t'[' -k2 -rn | head -25 | cut -c1-220 >>"$BODY"
    total=$(grep -E "^SKIPPED \[" "$OUT_DIR/tests.log" | sed -E 's/^SKIPPED \[([0-9]+)\].*/\1/' | awk '{n += $1} END {print n}')
    SKIPS+=("tests: $total skipped, $nskip reason(s) (see below and tests.log); the top ones: $(grep -E "^SKIPPED \[" "$OUT_DIR/tests.log" | sort -t'[' -k2 -rn | head -3 | sed -E 's/^SKIPPED \[([0-9]+)\] [^ ]+ /\1x /' | cut -c1-110 | paste -sd';')")
  fi
  if [ $rc -ne 0 ]; then  # per-file counts, to see what a limit or a crash left unrun
    grep -oE "(PASSED|FAILED|ERROR|SKIPPED) tests/[^:]+" "$OUT_DIR/tests.log" | sort | uniq -c | sort -k2 >>"$BODY"
  fi
  result test $rc "$t0" "$TEST_BUDGET" "${counts:-no pytest summary line (see tests.log)}"
fi

if has report; then
  report_args=(--budget "$(( REPORT_BUDGET - 20 ))" --out "$OUT_DIR/gpu-report.json" --only "$REPORT_SECTIONS")
  [ -n "${REPORT_SECTION_BUDGETS:-}" ] && report_args+=(--section-budget "$REPORT_SECTION_BUDGETS")
  log "gpu_report (limit ${REPORT_BUDGET}s): ${report_args[*]}"
  t0=$(date +%s)
  limited "$REPORT_BUDGET" TERM "$OUT_DIR/gpu-report.log" $PY -m bench.gpu_report "${report_args[@]}"
  rc=$?
  detail=""
  if [ -f "$OUT_DIR/gpu-report.json" ]; then
    cp "$OUT_DIR/gpu-report.json" "$RESULTS_DIR/${P_tag}-$(date +%F)-gpu-report.json"
    $PY -c "$REPORT_SUMMARY" "$OUT_DIR/gpu-report.json" >"$WORK/report-summary" 2>&1
    detail=$(sed -n 2p "$WORK/report-summary")
    cat "$WORK/report-summary" >>"$BODY"
    nskipped=$(grep -c "not measured:" "$WORK/report-summary")
    cut_secs=$(head -1 "$WORK/report-summary" | grep -oE "[a-z]+ (cut at|skipped:)[^;]*" | paste -sd';')
    [ "$nskipped" -gt 0 ] && SKIPS+=("report: rows not measured (budget or a missing peer), see gpu-report.json 'skipped'; first: $(grep -m1 "not measured:" "$WORK/report-summary" | sed 's/^ *not measured: //' | cut -c1-120)")
    [ -n "$cut_secs" ] && SKIPS+=("report sections cut: $cut_secs")
  else
    detail="no gpu-report.json"
  fi
  grep -E "^  |^\[" "$OUT_DIR/gpu-report.log" | cut -c1-220 >>"$BODY"
  targets
  result report $rc "$t0" "$REPORT_BUDGET" "$detail"
fi

if has bench; then
  log "pytest-benchmark suites (limit ${BENCH_BUDGET}s)"
  t0=$(date +%s)
  limited "$BENCH_BUDGET" INT "$OUT_DIR/bench.log" $PY -m pytest -q -p no:cacheprovider ${BENCH_ARGS:-bench} \
    --benchmark-json "$OUT_DIR/bench.json" --benchmark-max-time=0.05 --benchmark-min-rounds=3 \
    --benchmark-columns=min,median,rounds
  rc=$?
  [ -f "$OUT_DIR/bench.json" ] && cp "$OUT_DIR/bench.json" "$RESULTS_DIR/${P_tag}-$(date +%F)-bench.json"
  result bench $rc "$t0" "$BENCH_BUDGET"
fi

if has train; then
  methods=()
  IFS=',' read -r -a wanted <<<"$TRAIN_METHODS"
  for m in "${wanted[@]}"; do
    if [[ $m == qgalore* ]] && [ -z "${P_bnb:-}" ]; then
      skip "train method $m: needs bitsandbytes (${P_bnb_why:-not importable})"
    elif [ "$m" = galore-torch ] && [ -z "${P_galore_torch:-}" ]; then
      skip "train method $m: needs galore-torch (${P_galore_torch_why:-not importable})"
    else
      methods+=("$m")
    fi
  done
  if [ ${#methods[@]} -eq 0 ]; then
    skip "train: none of TRAIN_METHODS=$TRAIN_METHODS can run here"
  else
    joined=$(IFS=,; echo "${methods[*]}")
    read -r -a targs <<<"$TRAIN_ARGS"
    log "train (limit ${TRAIN_BUDGET}s): --methods $joined ${targs[*]}"
    mkdir -p "$OUT_DIR/train"
    t0=$(date +%s)
    limited "$TRAIN_BUDGET" TERM "$OUT_DIR/train.log" $PY -m weightkit train --device cuda --out-dir "$OUT_DIR/train" \
      --methods "$joined" "${targs[@]}"
    rc=$?
    tail -12 "$OUT_DIR/train.log" | cut -c1-300 >>"$BODY"
    for f in "$OUT_DIR"/train/train-*; do [ -f "$f" ] && cp "$f" "$RESULTS_DIR/${P_tag}-$(basename "$f")"; done
    targets
    result train $rc "$t0" "$TRAIN_BUDGET" "methods $joined"
  fi
fi

[ $no_gpu -eq 1 ] && [ $status -eq 0 ] && status=2
log "done, status $status"
FINISHED=", finished"
write_summary
exit $status
