#!/usr/bin/env bash
# robustlab on one CUDA GPU: a fast smoke of train → eval --suite standard → rift, then RiFT and the standard
# suite on all 10,000 test images of session 20's residual networks (docs/results.md, "On a GPU").
#
#   RUNS=runs/s20 DATA=/usr/share/datasets/fashion-mnist WORK=runs/gpu SECONDS_LEFT=420 bash experiments/gpu_check.sh
#
# RUNS holds pgd-at, trades-joint and mart-joint (last checkpoints) and trades20-joint-s0 (best). The long jobs
# share the GPU and each stops after SECONDS_LEFT; running the script again resumes them (RiFT's caches,
# AutoAttack's state files).
set -u
RUNS=${RUNS:-runs/s20} DATA=${DATA:-/usr/share/datasets/fashion-mnist} WORK=${WORK:-runs/gpu}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} MPLBACKEND=Agg
RL="python3 -m robustlab"
D="--device cuda --data-dir $DATA"
mkdir -p "$WORK/logs"
log() { echo "$(date +%T) $*" | tee -a "$WORK/logs/times.log"; }

log smoke
$RL train --model cnn-small --train-n 2000 --epochs 1 --val-n 200 --steps 2 $D --out "$WORK/smoke-train" \
    > "$WORK/logs/smoke.log" 2>&1 &&
$RL eval "$WORK/smoke-train" --suite standard --n 200 --aa-steps 5 --aa-queries 50 --sanity-n 100 --sweep-n 100 $D \
    --out "$WORK/smoke-eval" >> "$WORK/logs/smoke.log" 2>&1 &&
$RL rift "$RUNS/trades-joint" --checkpoint last --out "$WORK/smoke-rift" --bn recalibrate --module net.layer4.1.conv2 \
    --lr 0.01 --augment none $D --train-n 1000 --val-n 200 --epochs 1 --recal-n 200 --mrc-n 200 --mrc-epochs 1 \
    --n 200 --aa-n 100 --aa-steps 5 --aa-queries 50 --test-batch-size 5000 >> "$WORK/logs/smoke.log" 2>&1
rc=$?
log "smoke rc=$rc"
[ $rc -eq 0 ] || { tail -30 "$WORK/logs/smoke.log"; exit 1; }

T=${SECONDS_LEFT:-420}
END=$(( $(date +%s) + T ))
RIFT="--bn recalibrate --module net.layer4.1.conv2 --lr 0.01 --augment none --test-batch-size 10000 $D"
SUITE="--suite standard --no-ood --sweep-n 0 --sanity-n 500 --batch-size 10000 --json $D"
job() {  # name, then the command; stops at END
    local name=$1; shift
    log "$name start"
    timeout $(( END - $(date +%s) )) "$@" > "$WORK/logs/$name.log" 2>&1
    log "$name rc=$?"
}
job rift-pgd-at $RL rift "$RUNS/pgd-at" --checkpoint last --out "$WORK/rift-pgd-at" $RIFT & p1=$!
job rift-trades-joint $RL rift "$RUNS/trades-joint" --checkpoint last --out "$WORK/rift-trades-joint" $RIFT & p2=$!
( job eval-mart-joint $RL eval "$RUNS/mart-joint" --checkpoint last $SUITE --out "$WORK/eval-mart-joint"
  job eval-trades20 $RL eval "$RUNS/trades20-joint-s0" --checkpoint best $SUITE --out "$WORK/eval-trades20" ) & p3=$!
wait $p1 $p2 $p3
log done
