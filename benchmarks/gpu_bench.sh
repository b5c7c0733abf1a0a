#!/usr/bin/env bash
# The GPU benchmarks in one command, each under its timeout (14 minutes at most; BENCHMARKS.md, "GPU"):
#   1. benchmarks/actor_bench.py: the model actor's batch loop (no Ray) vs a naive diffusers loop,
#      fp16 and bf16 UNet, batch 1..64, images/s and GPU utilisation;
#   2. benchmarks/extract_bench.py: the extraction stages (VAE bf16 vs float32, UNet with the capture
#      vs diffusers keeping every probability), fp16 and bf16;
#   3. benchmarks/pamr_cost_bench.py: --boundaries pamr's refinement per 512 px image against the
#      VAE + UNet on the same GPU (issue 22);
#   4. benchmarks/ncut_cost_bench.py: --grouping ncut's cut per 512 px image (both affinities, auto)
#      against the VAE + UNet and DiffSeg's KL merge, fp16, batch 8 (issue 33).
# Full-size SD 1.x architecture with RANDOM weights (no download). Figures and logs go to
# ${OUT:-bench-out}. Needs torch with CUDA, diffusers and scikit-image; wheels found in .whl/
# (diffusers and importlib_metadata, for a machine without network) are installed first.
set -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_bench: could not install the wheels in .whl/"; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, diffusers; assert torch.cuda.is_available()" 2>/dev/null \
    || { echo "gpu_bench: needs torch with a CUDA device and diffusers importable"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
timeout 360 python3 benchmarks/actor_bench.py --device cuda --json "$out/actor.json" 2>&1 | tee "$out/actor.log"
timeout 200 python3 benchmarks/extract_bench.py --device cuda --dtypes fp16,bf16 --batch-sizes 1,8,32,64 \
    --iterations 3 --json "$out/extract.json" 2>&1 | tee "$out/extract.log"
timeout 120 python3 benchmarks/pamr_cost_bench.py --device cuda 2>&1 | tee "$out/pamr.log"
timeout 150 python3 benchmarks/ncut_cost_bench.py --model sd14-architecture --device cuda --dtype fp16 --batch 8 \
    --image-size 512 --repeats 5 2>&1 | tee "$out/ncut.log"
