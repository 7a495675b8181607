#!/usr/bin/env bash
# Trains the gpu profile's dense base (needs a CUDA GPU); safe to re-run: it resumes where it stopped.
# Then: python -m workbench study run experiments/studies/gpu/placement.yaml  (and shared_expert, routing)
# BASE_RUN / BASE_SHIP: the run and shipped folders; BASE_ARGS: extra train flags (check.sh's dry run uses them
# to train on a few synthetic images on the CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
BASE_RUN=${BASE_RUN:-experiments/runs/gpu/dense}
BASE_SHIP=${BASE_SHIP:-experiments/checkpoints/vimoe_small_fmnist_dense}
RESUME=()  # train refuses --resume on a folder without a checkpoint: a fresh machine starts the run
[ -f "$BASE_RUN/checkpoint.pt" ] && RESUME=(--resume)
# shellcheck disable=SC2086  # BASE_ARGS is a list of flags
$PY -m workbench train --config experiments/gpu/dense.yaml "${RESUME[@]}" --output "$BASE_RUN" ${BASE_ARGS:-}
$PY -m workbench.train.ship "$BASE_RUN" "$BASE_SHIP"
