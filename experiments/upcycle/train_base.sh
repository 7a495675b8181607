#!/usr/bin/env bash
# Trains the upcycle protocol's dense base (about 10 min on one idle CPU thread); safe to re-run: it resumes where it
# stopped. The run goes to experiments/runs/upcycle/dense; it is shipped to experiments/checkpoints/vimoe_micro_fmnist_dense
# (tracked, used by the recorded upcycle studies) only when that folder does not exist yet, or with --ship (SHIP=1).
# Then: python -m workbench study run experiments/studies/upcycle/placement.yaml --jobs 2  (and shared_expert, routing)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SHIP=${SHIP:-0}
for arg in "$@"; do
  case "$arg" in
    --ship) SHIP=1 ;;
    *) echo "unknown argument $arg: use --ship to replace the shipped base" >&2; exit 2 ;;
  esac
done
DEST=experiments/checkpoints/vimoe_micro_fmnist_dense
$PY -m workbench train --config experiments/upcycle/dense.yaml --resume
if [ "$SHIP" = 1 ] || [ ! -e "$DEST" ]; then
  $PY -m workbench.ship experiments/runs/upcycle/dense "$DEST"
else
  echo "kept the shipped $DEST (the recorded upcycle studies start from it); pass --ship to replace it"
fi
