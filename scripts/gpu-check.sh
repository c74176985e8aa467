#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: tests/test_gpu.py (every method on the GPU against
# the CPU, the command line on the GPU, resume on the GPU and across devices, torchrun on NCCL)
# and the MAML and per-method benchmarks on --device cuda. Run from the repository root:
#
#     scripts/gpu-check.sh OMNIGLOT_DIR OUT_DIR
#
# OMNIGLOT_DIR holds the two official archives; logs and benchmark JSON go to OUT_DIR.
# Uses the python3 on the PATH with the repository's src/ first on PYTHONPATH (no install
# needed where torch, numpy, pillow, click, tqdm, matplotlib and pytest are present; with
# pytest-xdist and pytest-timeout the tests run in parallel, each with a time limit).
set -u -o pipefail
if [ $# -ne 2 ]; then
    echo "usage: scripts/gpu-check.sh OMNIGLOT_DIR OUT_DIR (from the repository root)" >&2
    exit 2
fi
omniglot=$(realpath "$1"); out=$(realpath "$2"); mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
export METALEARN_DATA="$omniglot" METALEARN_CACHE="${METALEARN_CACHE:-/tmp/metalearn-cache}"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())" | tee -a "$out/gpu.txt"
# build the preprocessed array once, before parallel tests read it
python3 -c "from metalearn.data.omniglot import load_omniglot; print('omniglot', load_omniglot().images.shape)" || status=1
parallel=$(python3 -c "import xdist, pytest_timeout" 2>/dev/null && echo "-n 9 --timeout 200" || echo "")
timeout 600 python3 -m pytest tests/test_gpu.py -p no:cacheprovider --tb=short -rfs --durations=6 $parallel 2>&1 \
    | tee "$out/test_gpu.log" || status=1
for kernels in reproducible fast; do
    # the configuration and rows of benchmarks/results/maml_step_cuda_5w1s_{reproducible,fast}.json
    python3 benchmarks/maml_step.py --configs 5w1s --extra-rows "" --device cuda --gpu-kernels $kernels --iters 20 \
        --json "$out/maml_step_cuda_5w1s_$kernels.json" 2>&1 | tee -a "$out/bench.log" || status=1
done
python3 benchmarks/methods.py --device cuda --iters 3 --methods maml,platipus,reptile \
    --json "$out/methods_cuda_reproducible.json" 2>&1 \
    | tee -a "$out/bench.log" || status=1
echo "gpu-check status $status"
exit $status
