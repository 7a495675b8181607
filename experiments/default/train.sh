#!/usr/bin/env bash
# Trains the shipped default model: a dense tiny ViT on Fashion-MNIST (dense.yaml), then upcycled to a ViMoE and
# fine-tuned (moe.yaml).  Safe to re-run: each step resumes where it stopped.
#
# The runs go to experiments/runs/default/{dense,moe}/ (checkpoint.pt, metrics.jsonl, model/).  The tracked,
# shipped checkpoints in experiments/checkpoints/ are overwritten ONLY when asked:
#     experiments/default/train.sh            # train; the shipped checkpoints stay as they are
#     experiments/default/train.sh --ship     # train, then replace experiments/checkpoints/vimoe_tiny_fmnist{_dense,}
#     SHIP=1 experiments/default/train.sh     # the same as --ship
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
SHIP=${SHIP:-0}
for arg in "$@"; do
    case "$arg" in
        --ship) SHIP=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "train.sh: unknown argument '$arg': use --ship (or none)" >&2; exit 2 ;;
    esac
done
$PY -m workbench train --config experiments/default/dense.yaml --resume
$PY -m workbench train --config experiments/default/moe.yaml --resume
if [ "$SHIP" = 1 ]; then
    $PY -m workbench.train.ship experiments/runs/default/dense experiments/checkpoints/vimoe_tiny_fmnist_dense
    $PY -m workbench.train.ship experiments/runs/default/moe experiments/checkpoints/vimoe_tiny_fmnist
else
    echo "trained: experiments/runs/default/dense/model and experiments/runs/default/moe/model"
    echo "(the shipped experiments/checkpoints/ are unchanged; run with --ship or SHIP=1 to replace them)"
fi
