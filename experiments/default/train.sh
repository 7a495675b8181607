#!/usr/bin/env bash
# Trains the shipped default checkpoint; safe to re-run (each step resumes where it stopped).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
$PY -m workbench train --config experiments/default/dense.yaml --resume
$PY -m workbench.ship experiments/runs/default/dense experiments/checkpoints/vimoe_tiny_fmnist_dense
$PY -m workbench train --config experiments/default/moe.yaml --resume
$PY -m workbench.ship experiments/runs/default/moe experiments/checkpoints/vimoe_tiny_fmnist
