#!/usr/bin/env bash
# Trains the upcycle protocol's dense base (about 10-15 min on one CPU thread); safe to re-run: it resumes where it
# stopped. It writes experiments/runs/upcycle/dense and ships the model to experiments/checkpoints/vimoe_micro_fmnist_dense.
# Then: python -m workbench study run experiments/studies/upcycle/placement.yaml --jobs 2  (and shared_expert, routing)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$PY -m workbench train --config experiments/upcycle/dense.yaml --resume
$PY -m workbench.ship experiments/runs/upcycle/dense experiments/checkpoints/vimoe_micro_fmnist_dense
