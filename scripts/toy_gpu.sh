#!/usr/bin/env bash
# The toy model's GPU block in two stages, run from the repository root on the GPU machine:
#
#   bash scripts/toy_gpu.sh train GPU RUN [MINUTES]   start the training, return at once
#   bash scripts/toy_gpu.sh report GPU RUN            wait for it, measure; results under $OUT
#
# GPU is a device index (the stage sees only that GPU, as cuda). RUN is a directory outside the
# checkout that lives between the two calls (e.g. /tmp/toy-run). Run it from the repository
# root: wheels in .whl/ (diffusers for the GPU image) are installed from there; without
# diffusers both stages exit with status 3 before starting anything.
#
# train: copies src/ to RUN/src (the run must not depend on the checkout staying in place) and
#   starts `python -m tailattn.toy.train --minutes MINUTES --device cuda --out RUN` (default
#   20 minutes, the default config and its stages) detached with setsid nohup. RUN receives the
#   weight shards, card.json, loss.json, loss.png, samples.png, train.log and, when the run ends,
#   train.rc (its exit status).
# report: waits for RUN/train.rc (at most WAIT_MINUTES, default 20), then
#   1. GPU: a capture of the new model (`python -m tailattn.toy.capture`, 10 steps, layers
#      first/middle/last, 4 steps); CPU, in the background: `tailattn study` (anatomy, recall,
#      table1) on it and on the synthetic presets wan-1.3b-480p and wan-14b-720p (sampled rows
#      and heads), then scripts/toy_anatomy.py;
#   2. GPU: scripts/toy_report.py (frame classifier, sample quality at the default guidance and
#      at 1, every selection x tail at keep 0.1, 0.2, 0.3), starting no new method after
#      REPORT_MINUTES (default 4.5);
#   every measurement is stopped REPORT_SECONDS (default 330) after the wait (what it wrote by
#   then stays); then
#   3. $OUT: the weight shards and card.json as they are, everything else in toy_results.tar.gz
#      (train/, report/, anatomy/, study-*/ reports, logs). About 6 minutes after the wait: call
#      it once RUN/train.rc exists, since the wait counts towards the call's own time limit.
#   Then, on the development machine: python scripts/toy_publish.py --out-dir OUT puts the weights,
#   tables and figures in place.
#
# For a CPU smoke test: DEVICE=cpu, TRAIN_ARGS (e.g. "--config tiny --max-steps 2"),
# REPORT_ARGS (extra toy_report.py options), PRESETS (synthetic presets, e.g. "small").
set -uo pipefail
stage=${1:?usage: toy_gpu.sh train|report GPU RUN [MINUTES]}
gpu=${2:?GPU index}
run=${3:?RUN directory}
OUT=${OUT:-out}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import diffusers" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
need_diffusers() {  # checked before anything starts in the background
  python3 -c "import diffusers" 2>/dev/null && return 0
  echo "toy_gpu.sh: diffusers is not importable (no .whl/ here to install it from: run from the" \
    "repository root, or put diffusers on PYTHONPATH)"
  exit 3
}

case $stage in
  train)
    need_diffusers
    minutes=${4:-20}
    mkdir -p "$run"
    rm -rf "$run/src" "$run/train.rc"
    cp -r src "$run/src"
    CUDA_VISIBLE_DEVICES=$gpu PYTHONPATH=$run/src:$PYTHONPATH setsid nohup bash -c \
      'python3 -m tailattn.toy.train --minutes "$0" --device "$2" --out "$1" $3 > "$1/train.log" 2>&1
       echo $? > "$1/train.rc"' "$minutes" "$run" "${DEVICE:-cuda}" "${TRAIN_ARGS:-}" \
      < /dev/null > /dev/null 2>&1 &
    echo "training started on GPU $gpu for $minutes minutes: $run/train.log, then $run/train.rc"
    ;;
  report)
    need_diffusers
    mkdir -p "$OUT"
    work=$(mktemp -d)
    waited=0
    while [ ! -f "$run/train.rc" ] && [ $waited -lt $((60 * ${WAIT_MINUTES:-20})) ]; do
      sleep 10
      waited=$((waited + 10))
    done
    mkdir -p "$work/train"
    cp "$run"/*.json "$run"/*.png "$run"/train.log "$work/train/" 2>/dev/null
    if [ "$(cat "$run/train.rc" 2>/dev/null)" != "0" ]; then
      tail -30 "$run/train.log"
      tar -czf "$OUT/toy_results.tar.gz" -C "$work" train
      echo "training did not finish with status 0 (train.rc: $(cat "$run/train.rc" 2>/dev/null))"
      exit 1
    fi
    tail -4 "$run/train.log"
    cp "$run"/toy-*.safetensors "$run/card.json" "$OUT/"
    deadline=$(($(date +%s) + ${REPORT_SECONDS:-330}))  # every measurement ends by then
    left() { echo $((deadline - $(date +%s))); }
    export CUDA_VISIBLE_DEVICES=$gpu
    timeout 180 python3 -m tailattn.toy.capture --out "$work/toy_capture.safetensors" \
      --weights "$run" --device "${DEVICE:-cuda}" > "$work/capture.log" 2>&1
    methods=topk,topk+uta,block-topk,block-topk+uta,block-topk+blocks
    (
      study() {  # NAME SOURCE QUERIES [--heads H]
        [ "$(left)" -gt 20 ] || return 0
        timeout "$(left)" python3 -m tailattn study --source "$2" --queries "$3" "${@:4}" \
          --experiments anatomy,recall,table1 --methods $methods --keep 0.1,0.2,0.3 \
          --out "$work/study-$1" > "$work/study-$1.log" 2>&1
      }
      study toy "$work/toy_capture.safetensors" 256
      compare=()
      for preset in ${PRESETS:-wan-1.3b-480p wan-14b-720p}; do
        heads=()  # the 14B preset: every fourth of its 40 heads
        [ "$preset" = wan-14b-720p ] && heads=(--heads 0,4,8,12,16,20,24,28,32,36)
        study "$preset" "synthetic:$preset" 256 "${heads[@]}"
        compare+=(--preset "$preset=$work/study-$preset/study.json")
      done
      timeout 30 python3 scripts/toy_anatomy.py --toy "$work/study-toy/study.json" "${compare[@]}" \
        --out "$work/anatomy" > "$work/anatomy.log" 2>&1
    ) &
    cpu_side=$!
    timeout "$(left)" python3 scripts/toy_report.py --device "${DEVICE:-cuda}" --weights "$run" \
      --max-minutes "${REPORT_MINUTES:-4.5}" --out "$work/report" ${REPORT_ARGS:-} \
      > "$work/report.log" 2>&1
    echo "toy_report exit $?"
    wait $cpu_side
    rm -f "$work/toy_capture.safetensors"
    tar -czf "$OUT/toy_results.tar.gz" -C "$work" .
    python3 -c "import json; t = json.load(open('$run/card.json'))['training']; \
print({k: t[k] for k in ('steps', 'steps_per_stage', 'seconds', 'final_loss', 'loss_trend')})"
    sed -n '/## Model quality/,$p' "$work/report/toy_report.md"
    head -40 "$work/report/toy_report.md"
    sed -n '1,16p' "$work/anatomy/anatomy.md"
    tail -n 3 "$work"/study-*.log "$work/capture.log"
    ls -la "$OUT"
    ;;
  *)
    echo "unknown stage $stage (train or report)"
    exit 2
    ;;
esac
