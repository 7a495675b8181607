#!/usr/bin/env bash
# Trains the shipped classifiers; safe to re-run: each step resumes where it stopped.
#   tiny      a dense tiny ViT on Fashion-MNIST (dense.yaml), upcycled to a ViMoE and fine-tuned (moe.yaml):
#             experiments/checkpoints/vimoe_tiny_fmnist{_dense,}
#   explorer  the app's default ViMoE (moe_scratch.yaml): scratch-confirm's arm last-2-top2, seed 103, a micro ViMoE
#             from random init whose routing beats random routers: experiments/checkpoints/vimoe_micro_fmnist_scratch
#             (about 3 min on one thread)
#   regime    upcycle4-regime's arm last-2-shared, seed 301, upcycled from vimoe_micro4_fmnist_dense (moe_micro4.yaml):
#             experiments/checkpoints/vimoe_micro4_fmnist (about 14 min; one thread, so that it reproduces its study
#             record exactly)
# With no name, all three.  The runs go to experiments/runs/default/{dense,moe,moe_scratch,moe_micro4}/
# (checkpoint.pt, metrics.jsonl, model/).  The tracked, shipped checkpoints are overwritten ONLY when asked:
#     experiments/default/train.sh [tiny|explorer|regime]          # train; the shipped checkpoints stay as they are
#     experiments/default/train.sh [tiny|explorer|regime] --ship   # train, then replace the shipped copies
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
        tiny|explorer|regime) WHICH="$WHICH $arg" ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "train.sh: unknown argument '$arg': name tiny, explorer and/or regime, and/or --ship" >&2; exit 2 ;;
    esac
done
WHICH=${WHICH:-tiny explorer regime}
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
        if [ "$name" = explorer ]; then config=moe_scratch; dest=vimoe_micro_fmnist_scratch
        else config=moe_micro4; dest=vimoe_micro4_fmnist; fi
        OMP_NUM_THREADS=1 $PY -m workbench train --config experiments/default/$config.yaml \
            $(resume experiments/runs/default/$config)
        if [ "$SHIP" = 1 ]; then
            $PY -m workbench.train.ship experiments/runs/default/$config experiments/checkpoints/$dest
            # the card's verdicts (random-router test per MoE layer), cached beside the weights
            OMP_NUM_THREADS=2 $PY -m workbench card --checkpoint experiments/checkpoints/$dest
        else
            echo "trained: experiments/runs/default/$config/model"
        fi
    fi
done
[ "$SHIP" = 1 ] || echo "(the shipped experiments/checkpoints/ are unchanged; run with --ship or SHIP=1 to replace them)"
