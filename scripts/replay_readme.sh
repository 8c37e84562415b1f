#!/usr/bin/env bash
# Replays the README's first command as a new user runs it: a fresh clone of this repository (its committed HEAD), a
# fresh venv, the README's install sequence run from the clone's root, then `python -m weightkit info` and the main
# job with a few steps (REPLAY_STEPS, default 4), every method that needs no extra package.
# Fails when the README has no such command, the install fails, the CPU kernel library did not load, a method fails,
# or the job prints a RuntimeWarning or a missing-kernel-library message. CI runs it after the test-suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
steps=${REPLAY_STEPS:-4}
work=$(mktemp -d "${TMPDIR:-/tmp}/weightkit-replay.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

# The README's command: the line of its first ```bash block that starts with `pip install` and ends with the main job.
# REPLAY_README_LINE replays another line instead (e.g. a README change before it is written).
readme_line=${REPLAY_README_LINE:-$(awk '/^```bash/{inblock=1; next} /^```/{if (inblock) exit}
  inblock && /^pip install/ {print; exit}' "$root/README.md")}
case "$readme_line" in
  *"&& python -m weightkit train") ;;
  *) echo "replay_readme: README.md's first bash block has no 'pip install ... && python -m weightkit train' line" \
       "(found: '${readme_line}')" >&2; exit 1 ;;
esac
install=${readme_line%" && python -m weightkit train"}
echo "replay_readme: README command: $readme_line"

git clone -q "$root" "$work/clone"
"$PYTHON" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
cd "$work/clone"
echo "replay_readme: installing from the clone's root: $install"
bash -c "set -euo pipefail; $install" > "$work/install.log" 2>&1 || {
  tail -n 40 "$work/install.log" >&2; echo "replay_readme: the README's install sequence failed" >&2; exit 1; }
echo "replay_readme: installed in $(( $(date +%s) - start )) s"

python -m weightkit info | tee "$work/info.log"
if ! grep -Eq '^ +cpu +ok' "$work/info.log"; then
  echo "replay_readme: the cpu backend is not ok after the README's install (see weightkit info above)" >&2; exit 1
fi

# every method the README's install can run (galore-torch needs the dev extra's reference package)
methods=adamw,galore,galore-layerwise,qgalore,qgalore-layerwise
set +e
python -W default -m weightkit train --steps "$steps" --methods "$methods" --out-dir "$work/results" \
  > "$work/train.log" 2>&1
status=$?
set -e
cat "$work/train.log"
if [ "$status" -ne 0 ]; then
  echo "replay_readme: python -m weightkit train exited $status" >&2; exit 1
fi
if grep -Eq 'RuntimeWarning|not found .*ops use|kernel library .* not found' "$work/train.log"; then
  echo "replay_readme: the main job printed a RuntimeWarning or ran without its kernel library (above)" >&2; exit 1
fi
python - "$work/results" "$methods" <<'PY'
import glob, json, sys
results = json.load(open(sorted(glob.glob(sys.argv[1] + "/train-*.json"))[-1]))["results"]
ran = {r["method"]: r["error"] for r in results}
expected = sys.argv[2].split(",")
bad = [m for m in expected if m not in ran or ran[m] is not None]
if bad:
    sys.exit(f"replay_readme: methods without a result: {bad}: {ran}")
print(f"replay_readme: every method trained: {', '.join(expected)}")
PY
echo "replay_readme: passed in $(( $(date +%s) - start )) s"
