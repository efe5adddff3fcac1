#!/usr/bin/env bash
# One GPU call of a development session: build-check-time steps in stages, results under $OUT.
#
#   bash scripts/gpu_session.sh STAGE...      (run from the repository root on the GPU machine)
#
# Stages: env (versions), tests (the suite on the GPU: kernels for real, sync-freedom, CUDA
# graphs), calls (per-call table of the working tree; calls-old: the same for an older checkout
# unpacked in .old/src), e2e-small (Wan2.1-1.3B and the HunyuanVideo-sized model, eager and
# compiled), e2e-14b (Wan2.1-14B 720p). Wheels in .whl (diffusers for the GPU image) are
# installed first when present. Every stage appends to $OUT/log.txt.
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
      python3 -m pytest -q -p no:cacheprovider --maxfail=30 -x tests/test_gpu_fast_path.py 2>&1 | tail -40 | log
      python3 -m pytest -q -p no:cacheprovider --maxfail=30 -n 8 tests 2>&1 | tail -40 | log
      ;;
    calls)
      python3 -m tailattn.bench.calls --json "$OUT/calls_new.json" 2>&1 | log
      ;;
    calls-old)
      PYTHONPATH=$PWD/.old/src:/tmp/site python3 src/tailattn/bench/calls.py --json "$OUT/calls_old.json" 2>&1 | log
      ;;
    e2e-small)
      python3 -m tailattn.bench.e2e --models wan-1.3b-480p,hunyuan-544p --json "$OUT/e2e_small.json" 2>&1 | log
      ;;
    e2e-14b)
      python3 -m tailattn.bench.e2e --models wan-14b-720p --reps 2 \
        --methods "block-topk+drop@0.1;block-topk+uta@0.1;block-topk+uta@0.2;radial+uta@0.1;svg2+uta@0.1;rectified" \
        --json "$OUT/e2e_14b.json" 2>&1 | log
      ;;
    *) echo "unknown stage $stage" | log ;;
  esac
done
