#!/usr/bin/env bash
# AutoAttack-standard on all 10,000 test images for several checkpoints at once on one CUDA GPU: the figures that
# take hours per model on this project's CPU and minutes on a GPU (docs/results.md, "Still to measure").
#
#   DATA=/usr/share/datasets/fashion-mnist WORK=runs/gpu-aa SECONDS_LEFT=420 bash experiments/gpu_autoattack.sh \
#       trades-w32-s1=runs/gpu-carry/trades-w32-s1.safetensors \
#       rift-trades-w32-s1=runs/gpu-carry/rift-trades-w32-s1.safetensors
#
# Each argument is NAME=CHECKPOINT (a .safetensors file carries its own metadata, so a copy of the file alone is
# enough to carry to the device). First the CPU/GPU agreement test of tests/test_cli.py, which skips without a
# GPU; then `robustlab eval --suite standard --no-ood` of every checkpoint, all sharing the GPU, each stopped after
# SECONDS_LEFT. Running the script again resumes each job from its AutoAttack state file in WORK/NAME.
# A smoke test anywhere: DEVICE=cpu EXTRA="--n 20 --aa-steps 2 --aa-queries 10 --sanity-n 20".
set -u
DATA=${DATA:-/usr/share/datasets/fashion-mnist} WORK=${WORK:-runs/gpu-aa} T=${SECONDS_LEFT:-420}
DEVICE=${DEVICE:-cuda} EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} MPLBACKEND=Agg
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ $# -gt 0 ] || { echo "usage: bash experiments/gpu_autoattack.sh NAME=CHECKPOINT ..." >&2; exit 2; }
[ -d "$DATA" ] || { echo "no dataset folder $DATA: set DATA to where the Fashion-MNIST idx files are" >&2; exit 2; }
for job in "$@"; do
    [ -f "${job#*=}" ] || { echo "no checkpoint file ${job#*=} (argument $job; expected NAME=CHECKPOINT)" >&2; exit 2; }
done
mkdir -p "$WORK/logs"
log() { echo "$(date +%T) $*" | tee -a "$WORK/logs/times.log"; }

log "agreement test"
python3 -m pytest -rA tests/test_cli.py -k cuda > "$WORK/logs/agreement.log" 2>&1
log "agreement test rc=$? ($(grep -E "passed|failed|skipped|error" "$WORK/logs/agreement.log" | tail -1))"

END=$(( $(date +%s) + T ))
for job in "$@"; do
    name=${job%%=*} ckpt=${job#*=}
    ( log "$name start"
      timeout $(( END - $(date +%s) )) python3 -m robustlab eval "$ckpt" --suite standard --no-ood --sweep-n 0 \
          --sanity-n 500 --batch-size 10000 --json --device "$DEVICE" --data-dir "$DATA" --out "$WORK/$name" $EXTRA \
          > "$WORK/logs/$name.log" 2>&1
      log "$name rc=$?" ) &
done
wait
log done
