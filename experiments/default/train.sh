#!/usr/bin/env bash
# Trains the shipped classifiers; safe to re-run: each step resumes where it stopped.
#   tiny      a dense tiny ViT on Fashion-MNIST (dense.yaml), upcycled to a ViMoE and fine-tuned (moe.yaml):
#             experiments/checkpoints/vimoe_tiny_fmnist{_dense,}
#   explorer  the app's default ViMoE (moe_micro4.yaml): the upcycle4-regime arm last-2-shared, seed 301, upcycled
#             from experiments/checkpoints/vimoe_micro4_fmnist_dense: experiments/checkpoints/vimoe_micro4_fmnist
#             (about 13 min on one thread; one thread, so that it reproduces its study record exactly)
# With no name, both.  The runs go to experiments/runs/default/{dense,moe,moe_micro4}/ (checkpoint.pt,
# metrics.jsonl, model/).  The tracked, shipped checkpoints are overwritten ONLY when asked:
#     experiments/default/train.sh [tiny|explorer]          # train; the shipped checkpoints stay as they are
#     experiments/default/train.sh [tiny|explorer] --ship   # train, then replace the shipped copies
#     SHIP=1 experiments/default/train.sh                   # the same as --ship
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# --resume only where a checkpoint is (train refuses --resume on a folder without one, to catch a typo)
resume() { [ -f "$1/checkpoint.pt" ] && echo --resume || true; }
SHIP=${SHIP:-0}
WHICH=""
for arg in "$@"; do
    case "$arg" in
        --ship) SHIP=1 ;;
        tiny|explorer) WHICH="$WHICH $arg" ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "train.sh: unknown argument '$arg': name tiny and/or explorer, and/or --ship" >&2; exit 2 ;;
    esac
done
WHICH=${WHICH:-tiny explorer}
for name in $WHICH; do
    if [ "$name" = tiny ]; then
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $PY -m workbench train --config experiments/default/dense.yaml $(resume experiments/runs/default/dense)
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $PY -m workbench train --config experiments/default/moe.yaml $(resume experiments/runs/default/moe)
        if [ "$SHIP" = 1 ]; then
            $PY -m workbench.train.ship experiments/runs/default/dense experiments/checkpoints/vimoe_tiny_fmnist_dense
            $PY -m workbench.train.ship experiments/runs/default/moe experiments/checkpoints/vimoe_tiny_fmnist
        else
            echo "trained: experiments/runs/default/dense/model and experiments/runs/default/moe/model"
        fi
    else
        OMP_NUM_THREADS=1 $PY -m workbench train --config experiments/default/moe_micro4.yaml $(resume experiments/runs/default/moe_micro4)
        if [ "$SHIP" = 1 ]; then
            $PY -m workbench.train.ship experiments/runs/default/moe_micro4 experiments/checkpoints/vimoe_micro4_fmnist
            # the card's verdicts (random-router test per MoE layer), cached beside the weights
            OMP_NUM_THREADS=2 $PY -m workbench card --checkpoint experiments/checkpoints/vimoe_micro4_fmnist
        else
            echo "trained: experiments/runs/default/moe_micro4/model"
        fi
    fi
done
[ "$SHIP" = 1 ] || echo "(the shipped experiments/checkpoints/ are unchanged; run with --ship or SHIP=1 to replace them)"
