#!/usr/bin/env bash
# Trains the shipped segmentation model (seg.yaml) on Fashion-MNIST scenes.  Safe to re-run: it resumes where it
# stopped.  The run goes to experiments/runs/segmentation/seg/; the tracked checkpoint
# experiments/checkpoints/vimoe_seg_micro_scenes is replaced ONLY with --ship (or SHIP=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# --resume only where a checkpoint is (train refuses --resume on a folder without one, to catch a typo)
resume() { [ -f "$1/checkpoint.pt" ] && echo --resume || true; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
SHIP=${SHIP:-0}
for arg in "$@"; do
    case "$arg" in
        --ship) SHIP=1 ;;
        -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
        *) echo "train.sh: unknown argument '$arg': use --ship (or none)" >&2; exit 2 ;;
    esac
done
$PY -m workbench train --config experiments/segmentation/seg.yaml $(resume experiments/runs/segmentation/seg)
if [ "$SHIP" = 1 ]; then
    $PY -m workbench.train.ship experiments/runs/segmentation/seg experiments/checkpoints/vimoe_seg_micro_scenes
else
    echo "trained: experiments/runs/segmentation/seg/model (run with --ship or SHIP=1 to replace the shipped one)"
fi
