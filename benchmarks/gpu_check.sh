#!/usr/bin/env bash
# One short GPU check: GPU tests + benchmarks in one call, JSON results in $OUT (or
# benchmarks/results/gpu-<date>/). Meant for the lent H100/H200 (torch and Triton preinstalled
# there; galore-torch and bitsandbytes travel as wheels in .whl/, see benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh                  # everything: about 10 minutes on an H100
#   bash benchmarks/gpu_check.sh compile tests step   # some parts (compile, tests, step, 7b, e2e)
#
# Each part runs whatever happened before it: a failing part sets the exit status and the next
# part still runs, so one failure hides none of the others. The compile check comes first (it
# needs no GPU, but on the GPU's Triton it shows what the other parts will launch).
set -uo pipefail
PARTS="${*:-compile tests step 7b e2e}"
want() { [[ " $PARTS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$OUT/device.txt"

status=0
# 0. every kernel compiled for sm_80/86/89/90 with this machine's Triton (registers, spills, shared
#    memory per launch config), then the device's own target is the one the tests below launch.
if want compile; then
  python3 -m galore_opt.kernels.aot --json "$OUT/aot.json" > "$OUT/aot.txt" 2>&1 || status=1
  head -n 14 "$OUT/aot.txt"
fi

# 1. tests on the GPU: the GPU-marked tests and the kernel tests (same files as the interpreter runs).
if want tests; then
  python3 -m pytest -q -m gpu --ignore=tests/kernels -p no:cacheprovider 2>&1 | tail -n 30 > "$OUT/pytest.txt" || status=1
  python3 -m pytest -q tests/test_fake_cuda_and_meta.py -p no:cacheprovider 2>&1 | tail -n 30 > "$OUT/pytest-fake.txt" || status=1
  python3 -m pytest -q tests/kernels -p no:cacheprovider 2>&1 | tail -n 30 > "$OUT/pytest-kernels.txt" || status=1
  tail -n 3 "$OUT/pytest.txt" "$OUT/pytest-kernels.txt" "$OUT/pytest-fake.txt"
fi

# 2. optimizer step at the LLaMA-1B and LLaMA-7B matrix shapes (bf16), every implementation side by side (issue 3, 4):
#    1B 4 layers at rank 128 and 512; 7B 2 layers at rank 1024 (galore-torch's SVDs take ~20 s per
#    refresh there: the 7B run times only the first, cold refresh).
if want step; then
  OPTS=adamw-fused,adamw-foreach,bnb-adamw8bit,galore-torch,galore-torch-8bit,ours-ref,ours-triton,ours-8bit,matmuls
  for RANK in 128 512; do
    python3 benchmarks/bench_step.py --device cuda --dtype bfloat16 --size 1b --layers 4 --rank $RANK \
      --optimizers $OPTS --steps 20 --refresh-repeats 1 --busy-retry -1 --out "$OUT/bench_step-1b-r$RANK.json" || status=1
  done
  python3 benchmarks/bench_step.py --device cuda --dtype bfloat16 --size 7b --layers 2 --rank 1024 \
    --optimizers $OPTS --steps 10 --skip-refresh --busy-retry -1 --out "$OUT/bench_step-7b-r1024.json" || status=1
fi

# 3. LLaMA-7B, 8-bit GaLore layer-wise, no checkpointing, under a hard 24 GiB cap (issue 5): 4x256 and
#    1x1024 first, then larger micro-batches until two in a row do not fit.
if want 7b; then
  timeout 240 python3 examples/pretrain_llama7b_24gb.py --device cuda --size 7b --find-max --steps 3 --cap-gib 24 \
    --out "$OUT/llama7b_24gb.json" || status=1
fi

# 4. end-to-end LLaMA-1B pre-training steps, bf16, batch 16 x 256 (issue 9): fused AdamW, galore-torch and
#    ours side by side; one refresh of every matrix among 6 timed steps (galore-torch's 168 SVDs take
#    minutes per refresh at this size, so one sample).
if want e2e; then
  timeout 330 python3 benchmarks/bench_e2e.py --device cuda --sizes 1b --warmup 1 --steps 6 --refresh-every 5 \
    --optimizers adamw,galore-torch,ours,ours-8bit,ours-8bit-layerwise --no-plots \
    --out "$OUT/bench_e2e-gpu-1b.json" || status=1
fi

exit $status
