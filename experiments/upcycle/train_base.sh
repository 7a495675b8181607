#!/usr/bin/env bash
# Trains an upcycle protocol dense base; safe to re-run: it resumes where it stopped.
#   experiments/upcycle/train_base.sh            dense.yaml: 7x7 patches, 30 epochs (about 10 min on one idle thread),
#                                                shipped to experiments/checkpoints/vimoe_micro_fmnist_dense
#   experiments/upcycle/train_base.sh dense_p4   dense_p4.yaml: 4x4 patches, 40 epochs, then 20-epoch chunks while
#                                                test accuracy is below 0.90, at most 80 epochs (it took all 80:
#                                                115 min on one thread of a shared 2-core machine), shipped to
#                                                experiments/checkpoints/vimoe_micro4_fmnist_dense
#   experiments/upcycle/train_base.sh dense_p4_avg  dense_p4_avg.yaml: dense_p4 with global_pool avg, one 80-epoch
#                                                cosine (about 2 h on one thread), shipped to
#                                                experiments/checkpoints/vimoe_micro4_fmnist_dense_avg
#   experiments/upcycle/train_base.sh dense_half dense_half.yaml: dense.yaml pretrained on labels 0-4 only (a
#                                                transfer base: the fine-tune learns five unseen classes), shipped to
#                                                experiments/checkpoints/vimoe_micro_fmnist_dense_half
# The run goes to experiments/runs/upcycle/<name>; it is shipped (tracked, used by the recorded upcycle studies)
# only when that folder does not exist yet, or with --ship (SHIP=1).
# Then: python -m workbench study run experiments/studies/upcycle/placement.yaml --jobs 2  (and shared_expert, routing)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# --resume only where a checkpoint is (train refuses --resume on a folder without one, to catch a typo)
resume() { [ -f "$1/checkpoint.pt" ] && echo --resume || true; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SHIP=${SHIP:-0}
NAME=dense
for arg in "$@"; do
  case "$arg" in
    --ship) SHIP=1 ;;
    dense|dense_p4|dense_p4_avg|dense_half) NAME=$arg ;;
    *) echo "unknown argument $arg: name a base (dense, dense_p4, dense_p4_avg or dense_half) and/or --ship to replace the shipped one" >&2
       exit 2 ;;
  esac
done
case "$NAME" in
  dense) DEST=experiments/checkpoints/vimoe_micro_fmnist_dense ;;
  dense_p4) DEST=experiments/checkpoints/vimoe_micro4_fmnist_dense ;;
  dense_p4_avg) DEST=experiments/checkpoints/vimoe_micro4_fmnist_dense_avg ;;
  dense_half) DEST=experiments/checkpoints/vimoe_micro_fmnist_dense_half ;;
esac
$PY -m workbench train --config "experiments/upcycle/$NAME.yaml" $(resume "experiments/runs/upcycle/$NAME")
if [ "$NAME" = dense_p4 ]; then
  # the stopping rule of dense_p4.yaml: 20-epoch chunks (each a warm restart of the cosine) while the last test
  # accuracy is below 0.90, at most 80 epochs
  for EPOCHS in 60 80; do
    # prints the last test accuracy; exits 0 when it meets the bar
    if $PY -c "import json,sys; a=json.loads(open(sys.argv[1]).read().splitlines()[-1])['test_acc']; print(a); \
sys.exit(0 if a >= 0.90 else 1)" "experiments/runs/upcycle/$NAME/metrics.jsonl"; then break; fi
    echo "test accuracy < 0.90: resuming to $EPOCHS epochs"
    $PY -m workbench train --config "experiments/upcycle/$NAME.yaml" --resume --epochs "$EPOCHS"
  done
fi
if [ "$SHIP" = 1 ] || [ ! -e "$DEST" ]; then
  $PY -m workbench.train.ship "experiments/runs/upcycle/$NAME" "$DEST"
else
  echo "kept the shipped $DEST (the recorded upcycle studies start from it); pass --ship to replace it"
fi
