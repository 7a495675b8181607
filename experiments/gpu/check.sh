#!/usr/bin/env bash
# GPU checks on a machine with a CUDA GPU (about 4 minutes on one H200 before the ViT-scale steps; the whole script
# must stay under 10 minutes on one GPU): the CUDA tests, a torchrun (nccl) run on real Fashion-MNIST, the gpu
# profile's dense base (experiments/gpu/train_base.sh, resumable), the MoE layer benchmark on CUDA at the tiny
# shape and at ViT-S/16 and ViT-B/16 shapes (256 x 197 tokens, h = 4d, E = 8 and 16, top-1/2, bf16), and one
# training step of ViMoE-S/16 against ViT-S/16 (img/s, peak memory).  Targets: each layer <= 1.3x its dense
# equivalent, the training step <= 1.15x.  Output: the console and experiments/runs/gpu/check.log.
#
#   bash experiments/gpu/check.sh             the real run (needs CUDA)
#   bash experiments/gpu/check.sh --dry-run   every step on the CPU with tiny shapes and steps, synthetic data,
#   CHECK_DRY_RUN=1 bash ...                  output in a temporary folder (or $CHECK_OUT); well under a minute
#
# Each step prints "== N. title"; the last line names every step that failed (exit status 1) or says all passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DRY=${CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "check.sh: unknown argument $arg: use --dry-run or none" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  OUT=${CHECK_OUT:-$(mktemp -d)}
  DEV=cpu
else
  OUT=experiments/runs/gpu
  DEV=cuda
fi
mkdir -p "$OUT"
FAILED=()

step() {  # step "title" command...: runs it, notes a failure, goes on
  local title=$1
  shift
  echo "== $title t=${SECONDS}s"
  "$@" || FAILED+=("$title")
}

run_checks() {
  if [ "$DRY" = 1 ]; then
    echo "dry run on the CPU: tiny shapes and steps, synthetic data, output in $OUT"
    step "1. CUDA tests (dry run: collected only)" \
      $PY -m pytest -q --collect-only -m gpu -p no:cacheprovider tests/test_dispatch.py tests/test_train.py \
        tests/test_segmentation.py tests/test_study.py
    step "2. torchrun --nproc_per_node=1 (dry run: gloo, synthetic data)" \
      $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m workbench train --model vimoe_micro_patch7_28 \
        --dataset synthetic --train-subset 64 --test-subset 32 --epochs 1 --batch-size 32 --moe-layers last-1 \
        --num-experts 4 --device cpu --output "$OUT/ddp" --quiet
    step "3. the gpu profile's dense base (dry run: the micro model, 64 synthetic images, 1 epoch)" \
      env PY="$PY" BASE_RUN="$OUT/dense" BASE_SHIP="$OUT/dense_shipped" \
        BASE_ARGS="--model vimoe_micro_patch7_28 --dataset synthetic --train-subset 64 --test-subset 32 --val-size 16 --epochs 1 --batch-size 32 --device cpu --quiet" \
        bash experiments/gpu/train_base.sh
    step "4. MoE layer benchmark (dry run: tiny layer, fp32 on cpu)" \
      $PY -m workbench bench moe --device cpu --batch 2 --tokens 8 --dim 16 --expert-hidden 32 --reps 1 --quiet \
        --routers topk
    step "5. MoE layer benchmark at ViT-S/16 and ViT-B/16 presets (dry run: tiny shapes)" \
      $PY -m workbench bench moe --device cpu --preset vit-s16 vit-b16 --batch 1 --tokens 8 --dim 16 \
        --expert-hidden 32 --dtype fp32 --reps 1 --quiet
    step "6. training step ViMoE-S/16 vs ViT-S/16 (dry run: 32x32 input, 2 blocks)" \
      $PY -m workbench bench step --device cpu --img-size 32 --depth 2 --batch 2 --steps 1 --warmup 0
  else
    nvidia-smi -L
    $PY -c "import sys, torch, timm; print(sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
    step "1. CUDA tests" \
      $PY -m pytest -q -m gpu tests/test_dispatch.py tests/test_train.py tests/test_segmentation.py tests/test_study.py
    step "2. torchrun --nproc_per_node=1 (nccl), 2 epochs on Fashion-MNIST" \
      $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m workbench train --model vimoe_micro_patch4_28 \
        --dataset fashion-mnist --epochs 2 --batch-size 256 --moe-layers last-2 --num-experts 8 --device cuda \
        --output "$OUT/ddp" --quiet
    step "3. the gpu profile's dense base" env PY="$PY" bash experiments/gpu/train_base.sh
    step "4. MoE layer benchmark on CUDA (bf16, T = 6,400, d = 192)" $PY -m workbench bench moe --device cuda --reps 20 --quiet
    step "5. MoE layer benchmark on CUDA at ViT-S/16 and ViT-B/16 shapes (bf16; target <= 1.3x)" \
      $PY -m workbench bench moe --device cuda --preset vit-s16 vit-b16 --reps 20 --quiet
    step "6. training step ViMoE-S/16 vs ViT-S/16 on CUDA (bf16, batch 128; target <= 1.15x)" \
      $PY -m workbench bench step --device cuda --batch 128 --steps 20
  fi
  echo "== done t=${SECONDS}s (limit 600 s on one GPU)"
  if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'check.sh: failed steps: %s\n' "$(IFS=';'; echo "${FAILED[*]}")"
    return 1
  fi
  echo "check.sh: all 6 steps passed$([ "$DRY" = 1 ] && echo ' (dry run)')"
}

run_checks 2>&1 | tee "$OUT/check.log"
