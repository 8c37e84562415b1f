#!/usr/bin/env bash
# Kernel benchmarks -> bench/results/<device>-<date>[-<SUITE>].json (device, versions, GB/s in extra_info).
# Usage: bash scripts/bench.sh                                 (every suite)
#        SUITE=quant bash scripts/bench.sh bench/test_bench_quant.py   (one suite, its own JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then . .venv/bin/activate; fi
tag=$(python -c "from weightkit.benchreport import device_tag; print(device_tag())")
out="bench/results/${tag}-$(date +%Y-%m-%d)${SUITE:+-$SUITE}.json"
mkdir -p bench/results
python -m pytest -q -p no:cacheprovider "${@:-bench}" --benchmark-json "$out" --benchmark-columns=min,mean,median,rounds
python -m weightkit.benchreport "$out" --png "${out%.json}.png"
