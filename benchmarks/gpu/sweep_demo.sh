#!/usr/bin/env bash
# Train variants of the demo config side by side on one GPU and collect their samples.png
# (the sweep recorded in benchmarks/RESULTS.md). Each variant costs about what the demo does
# on a CPU, except the one with more steps.
#
#   bash benchmarks/gpu/sweep_demo.sh OUTDIR [extra overrides, e.g. text_encoder.path=DIR]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: sweep_demo.sh OUTDIR [overrides]}; shift
work=$(mktemp -d); mkdir -p "$out"
run() {
  local name=$1; shift
  python3 pretrain_ecdit.py --config examples/configs/demo.yaml "$@" "${EXTRA[@]}" \
    train.output_dir="$work/$name" "data.urls=$work/data_$name/{000000..000007}.tar" \
    train.progress=false train.log_interval=250 checkpoint.save_interval=0 \
    > "$work/$name.log" 2>&1
  cp "$work/$name/samples.png" "$out/$name.png" 2>/dev/null
  echo "$name: $(grep -o 'done in.*ratio [0-9.]*' "$work/$name.log" || echo failed, see "$work/$name.log")"
}
EXTRA=("$@")
run control &
run lr4e-3_b95 optim.lr=4.0e-3 optim.min_lr=4.0e-4 "optim.betas=[0.9, 0.95]" &
run lr1e-3 optim.lr=1.0e-3 optim.min_lr=1.0e-4 &
run img16_p2 data.image_size=16 model.patch_size=2 &
run img24_p3 data.image_size=24 model.patch_size=3 &
run steps2250 train.steps=2250 &
wait
