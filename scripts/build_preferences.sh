#!/usr/bin/env bash
# Rebuild data/preferences/{train,eval}.jsonl: the shipped small preference set, made by align itself.
#   1. `align generate`: the embedded SmolLM2-135M-Instruct samples 2 answers per task prompt (seeded, temperature 1,
#      stored token ids and log-probs: the provenance columns), paired at random;
#   2. `align label --simulate gold`: 3 simulated annotators vote with the task suite's gold scorers;
#   3. `align export`: the native preference format with every provenance column (data/README.md).
# Train: 3 prompts per task family from data/tasks/train.jsonl (21 pairs); eval: 1 per family from data/tasks/eval.jsonl
# (7 pairs). Small on purpose: it is there so every shipped config runs as shipped; make your own the same way.
# Usage: scripts/build_preferences.sh [OUT_DIR]   (CPU, a few minutes; needs `make setup`)
set -euo pipefail
OUT=${1:-data/preferences}
ALIGN=${ALIGN:-.venv/bin/align}  # or any `align` on PATH
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
for split in train eval; do
  per_family=$([ "$split" = train ] && echo 3 || echo 1)
  db="sqlite:///$WORK/$split.db"
  "$ALIGN" generate --model smollm2-135m-instruct --prompts "tasks:$split" --per_family "$per_family" --n 2 \
    --max_new_tokens 32 --seed 0 --db "$db"
  "$ALIGN" label --simulate gold --db "$db" --seed 0
  "$ALIGN" export --db "$db" --out "$OUT/$split.jsonl"
done
