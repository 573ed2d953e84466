#!/usr/bin/env bash
# Issue 17's device measurements in one call (the GPU machine has no TensorFlow: the step and
# inference benchmarks need none). Not run yet; the timeouts cap it at 560 s, under the device
# tool's 600 s per call. Each line prints what docs/PERFORMANCE.md records.
#   bash bench/gpu_buckets.sh 2>&1 | tee /tmp/gpu_buckets.log
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.65  # room for torch in the same process
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__)"
# The benchmarks build their model from configs/ (ml_collections), which the GPU machine lacks:
# carry its wheel in .whl/ (pip download ml-collections --no-deps -d .whl) and the run's carry.
python3 -c "import ml_collections" 2>/dev/null || \
    pip install --no-index --no-deps --find-links .whl ml_collections
# The recipe's buckets, 16 images per step, steps alternating between them; inference at batch
# 1 and 8 on each canvas; then a profile of 5 steps on the landscape canvas (top kernels).
timeout 360 python3 bench/train_step.py --canvas 800x1344,1344x800 --pairs 8 --dtype bfloat16 \
    --steps 20 --warmup 2 --infer 1,8 --profile /tmp/df2_profile
# The torchvision peer at the same batch on the landscape canvas.
timeout 200 python3 bench/train_step.py --canvas 800x1344 --pairs 8 --steps 20 --warmup 2 \
    --peer_only
