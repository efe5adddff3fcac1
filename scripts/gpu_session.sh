#!/usr/bin/env bash
# One GPU call of a development session: build-check-time steps in stages, results under $OUT.
#
#   bash scripts/gpu_session.sh STAGE...      (run from the repository root on the GPU machine)
#
# Stages: env (versions), tests (the GPU test files: kernels for real, sync-freedom, CUDA
# graphs), suite (every test), skip (in-loop skipping on synthetic attention; skip-toy: on a
# capture of the shipped toy model, layer 4 at step 13 of 20), calls (per-call table; calls-old: the
# same for an older checkout unpacked in .old/src; calls-block-err: block-err's rows and its
# kernels by time), toy-keep03 (the shipped toy's keep-0.3 cells the first report missed; measured since), e2e-eager (Wan2.1-1.3B and the
# HunyuanVideo-sized model), e2e-compiled (Wan2.1-1.3B), e2e-14b (Wan2.1-14B 720p),
# e2e-14b-compiled (block-topk+drop and +uta at keep 0.1, compile_repeated_blocks()). Wheels
# in .whl (diffusers for the GPU image) are installed first when present. Every stage appends to $OUT/log.txt.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
log() { tee -a "$OUT/log.txt"; }
for stage in "$@"; do
  echo "=== $stage $(date -u +%FT%TZ)" | log
  case $stage in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | log
      python3 -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__, torch.cuda.get_device_name())" 2>&1 | log
      ;;
    tests)
      # ~2 min of Triton compiles per file on an H200; SIGINT lets pytest print its summary
      timeout -s INT -k 30 420 python3 -m pytest -q -rfE -p no:cacheprovider --maxfail=20 \
        tests/test_gpu_fast_path.py tests/test_svg2.py tests/test_skipping_kernel.py \
        tests/test_kernels.py tests/test_kmeans_kernel.py tests/test_error_aware.py 2>&1 | tail -60 | log
      ;;
    suite)
      timeout 420 python3 -m pytest -q -p no:cacheprovider --maxfail=30 tests 2>&1 | tail -40 | log
      ;;
    skip)
      timeout 240 python3 -m tailattn.bench.skipping --json "$OUT/skip_synthetic.json" 2>&1 | log
      ;;
    skip-toy)
      timeout 150 python3 -m tailattn.toy.capture --out /tmp/toy_capture.safetensors \
        --device cuda --steps 20 2>&1 | tail -3 | log &&
      timeout 240 python3 -m tailattn.bench.skipping --source /tmp/toy_capture.safetensors \
        --layer 4 --step 13 --json "$OUT/skip_toy.json" 2>&1 | log
      ;;
    calls)
      timeout 240 python3 -m tailattn.bench.calls --json "$OUT/calls_new.json" 2>&1 | log
      ;;
    calls-block-err)
      timeout 240 python3 -m tailattn.bench.calls --methods "block-topk+drop@0.1;block-topk+uta@0.1;block-err(for_tail=drop)@0.1;block-err(for_tail=drop, budget=adaptive)@0.1;block-err+uta@0.1;block-err(budget=adaptive)+uta@0.1" \
        --json "$OUT/calls_block_err.json" 2>&1 | log
      timeout 120 python3 scripts/profile_selection.py --methods "block-err(for_tail=drop);block-err;block-topk" 2>&1 | log
      ;;
    toy-keep03)
      # the 14 cells of the toy report's keep 0.3 that the last report did not reach (toy.md)
      timeout 150 python3 scripts/toy_report.py --device cuda --weights src/tailattn/toy/weights \
        --selections radial,dfs --keeps 0.3 --tails drop,uta,blocks,moment \
        --quality-clips 16 --guidances 3 --out "$OUT/toy-keep03-a" 2>&1 | tail -12 | log
      timeout 150 python3 scripts/toy_report.py --device cuda --weights src/tailattn/toy/weights \
        --selections block-topk,svg2 --keeps 0.3 --tails uta,blocks,moment \
        --quality-clips 16 --guidances 3 --out "$OUT/toy-keep03-b" 2>&1 | tail -12 | log
      ;;
    calls-old)
      PYTHONPATH=$PWD/.old/src:/tmp/site timeout 240 python3 src/tailattn/bench/calls.py \
        --json "$OUT/calls_old.json" 2>&1 | log
      ;;
    e2e-eager)
      timeout 300 python3 -m tailattn.bench.e2e --models wan-1.3b-480p,hunyuan-544p --modes eager \
        --json "$OUT/e2e_eager.json" 2>&1 | log
      ;;
    e2e-compiled)
      timeout 400 python3 -m tailattn.bench.e2e --models wan-1.3b-480p --modes compiled \
        --json "$OUT/e2e_compiled.json" 2>&1 | log
      ;;
    e2e-14b-compiled)
      timeout 500 python3 -m tailattn.bench.e2e --models wan-14b-720p --warmup 1 --reps 2 --modes compiled \
        --methods "block-topk+drop@0.1;block-topk+uta@0.1" --json "$OUT/e2e_14b_compiled.json" 2>&1 | log
      ;;
    e2e-14b)
      timeout 480 python3 -m tailattn.bench.e2e --models wan-14b-720p --reps 2 --modes eager \
        --methods "block-topk+drop@0.1;block-topk+uta@0.1;block-topk+uta@0.2;radial+uta@0.1;svg2+uta@0.1;rectified" \
        --json "$OUT/e2e_14b.json" 2>&1 | log
      ;;
    *) echo "unknown stage $stage" | log ;;
  esac
done
