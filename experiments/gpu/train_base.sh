#!/usr/bin/env bash
# Trains the gpu profile's dense base (needs a CUDA GPU); safe to re-run: it resumes where it stopped.
# Then: python -m workbench study run experiments/studies/gpu/placement.yaml  (and shared_expert, routing)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
$PY -m workbench train --config experiments/gpu/dense.yaml --resume
$PY -m workbench.train.ship experiments/runs/gpu/dense experiments/checkpoints/vimoe_small_fmnist_dense
