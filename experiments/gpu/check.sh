#!/usr/bin/env bash
# GPU checks on a machine with a CUDA GPU (about 4 minutes on one H200): the CUDA tests, a torchrun (nccl) run on
# real Fashion-MNIST, the gpu profile's dense base (experiments/gpu/train_base.sh, resumable), and the MoE layer
# benchmark on CUDA.  Output: the console and experiments/runs/gpu/check.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1
mkdir -p experiments/runs/gpu
{
  nvidia-smi -L
  $PY -c "import sys, torch, timm; print(sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
  echo "== CUDA tests"
  $PY -m pytest -q -m gpu tests/test_dispatch.py tests/test_train.py tests/test_segmentation.py tests/test_study.py
  echo "== torchrun --nproc_per_node=1 (nccl), 2 epochs on Fashion-MNIST"
  $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m workbench train --model vimoe_micro_patch4_28 \
      --dataset fashion-mnist --epochs 2 --batch-size 256 --moe-layers last-2 --num-experts 8 --device cuda \
      --output experiments/runs/gpu/ddp --quiet
  echo "== the gpu profile's dense base"
  PY=$PY bash experiments/gpu/train_base.sh
  echo "== MoE layer benchmark on CUDA (bf16)"
  $PY -m workbench bench moe --device cuda --reps 20
} 2>&1 | tee experiments/runs/gpu/check.log
