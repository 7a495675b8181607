#!/usr/bin/env bash
# Trains a segmentation model on Fashion-MNIST scenes.  Safe to re-run: it resumes where it stopped.
#   experiments/segmentation/train.sh             seg.yaml: the shipped segmentation ViMoE; the run goes to
#                                                 experiments/runs/segmentation/seg/, and the tracked checkpoint
#                                                 experiments/checkpoints/vimoe_seg_micro_scenes is replaced ONLY
#                                                 with --ship (or SHIP=1)
#   experiments/segmentation/train.sh dense_half  dense_half.yaml: the dense transfer base (scenes of labels 0-4;
#                                                 one thread, about 20 min), shipped to
#                                                 experiments/checkpoints/vimoe_seg_micro_scenes_dense_half when that
#                                                 folder does not exist yet, or with --ship
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# --resume only where a checkpoint is (train refuses --resume on a folder without one, to catch a typo)
resume() { [ -f "$1/checkpoint.pt" ] && echo --resume || true; }
SHIP=${SHIP:-0}
NAME=seg
for arg in "$@"; do
    case "$arg" in
        --ship) SHIP=1 ;;
        seg|dense_half) NAME=$arg ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "train.sh: unknown argument '$arg': name a model (seg or dense_half) and/or --ship" >&2; exit 2 ;;
    esac
done
if [ "$NAME" = seg ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    DEST=experiments/checkpoints/vimoe_seg_micro_scenes
else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    DEST=experiments/checkpoints/vimoe_seg_micro_scenes_dense_half
    [ -e "$DEST" ] || SHIP=1
fi
$PY -m workbench train --config "experiments/segmentation/$NAME.yaml" $(resume "experiments/runs/segmentation/$NAME")
if [ "$SHIP" = 1 ]; then
    $PY -m workbench.train.ship "experiments/runs/segmentation/$NAME" "$DEST"
else
    echo "trained: experiments/runs/segmentation/$NAME/model (run with --ship or SHIP=1 to replace $DEST)"
fi
