#!/usr/bin/env bash
# Reproduce the shipped default model with the project's own CLI only.
#   bash scripts/make_default_model.sh [WORKDIR]
# Writes WORKDIR/data (procedural dataset), WORKDIR/unpruned (trained model + metrics.json) and
# evaluation JSONs; copy WORKDIR/unpruned/model.{json,pt} to models/unpruned/ to ship it.
set -euo pipefail
cd "$(dirname "$0")/.."
source env.sh
WORK="${1:-/tmp/usn_default_model}"
SEED="${SEED:-0}"
COUNT="${COUNT:-2000}"
EPOCHS="${EPOCHS:-20}"
# The shipped models/default is the plain architecture; ARCH=homogeneous GAIN_WEIGHT=0.5
# EPOCHS=30 trains the certified-training model of docs/certification.md instead.
ARCH="${ARCH:-plain}"
GAIN_WEIGHT="${GAIN_WEIGHT:-0}"
mkdir -p "$WORK"
[ -d "$WORK/data" ] || usn-perception --quiet make-dataset --out "$WORK/data" --count "$COUNT" --seed "$SEED"
/usr/bin/time -v usn-perception --quiet train --data "$WORK/data" --out "$WORK/unpruned" \
  --epochs "$EPOCHS" --seed "$SEED" --arch "$ARCH" --gain-weight "$GAIN_WEIGHT" 2> "$WORK/train_time.txt" | tee "$WORK/train.log"
usn-perception --quiet evaluate --model "$WORK/unpruned" --data "$WORK/data/test/annotations.json" \
  --json > "$WORK/eval_test.json"
if usn-perception --quiet fetch-visp --labels "$WORK/mire2_pseudo.json"; then
  usn-perception --quiet evaluate --model "$WORK/unpruned" --data "$WORK/mire2_pseudo.json" \
    --json > "$WORK/eval_mire2.json"
else
  echo "ViSP mire-2 unavailable (apt could not fetch visp-images-data): skipped" >&2
fi
grep -E "Elapsed|Maximum resident" "$WORK/train_time.txt" || true
cat "$WORK/eval_test.json"
