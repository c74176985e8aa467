#!/usr/bin/env bash
# The GPU measurements of issue #27 item 3, in one go of about 7 minutes, prepared on a CPU
# machine so that a lent GPU's minutes go to measuring:
#   1. where a MAML meta-step's time goes on the GPU: kernels launched, their device time, the
#      step's wall time (benchmarks/maml_gpu_profile.py, 5w1s and 20w1s, both orders);
#   2. metalearn against learn2learn 0.2.0 on the same GPU and batch, with row (a) also captured
#      in a CUDA graph (benchmarks/maml_step.py --extra-rows graph,chunk1), torch's fast kernels;
#   3. the full 5-way 1-shot protocol's pace: `metalearn train maml` on Omniglot for 95 s of
#      its 60,000 steps (--time-limit), validation included, from which the full run's time follows;
#   4. the Neural Statistician's pace (#23): 40 s of `metalearn train statistician` at its
#      defaults (30 sets a step), from which the time of the published training length follows.
#
# Each part has its own timeout, together under 10 minutes (the device tool's limit for one
# command: give it timeout_s 590). Run from the repository root:
#
#     scripts/gpu-vs-learn2learn.sh OMNIGLOT_DIR L2L_SOURCE OUT_DIR
#
# OMNIGLOT_DIR holds the two official archives; L2L_SOURCE holds learn2learn's bare source (the
# `learn2learn` folder of its sdist), which runs on the machine's own torch through
# benchmarks/_peer_on_project_torch.py: nothing is installed there. Logs and JSON go to OUT_DIR
# (8 files, the most the device tool brings back). Prepare the two folders inside the checkout, ignored by git, so that they travel:
#
#   echo /.gpu/ >> .git/info/exclude && mkdir -p .gpu/omniglot
#   cp ../shared/data/omniglot/*.zip .gpu/omniglot/
#   pip download --no-deps learn2learn==0.2.0 -d /tmp/l2l && tar xzf /tmp/l2l/learn2learn-0.2.0.tar.gz -C /tmp/l2l
#   cp -r /tmp/l2l/learn2learn-0.2.0/learn2learn .gpu/
#
# then, on the device (carry [".gpu"]):  scripts/gpu-vs-learn2learn.sh .gpu/omniglot .gpu $OUT
#
# A dry run on a CPU machine checks the script itself, in about 3 minutes:
#   DEVICE=cpu CONFIGS=5w1s ITERS=1 MAML_SECONDS=20 STATISTICIAN_SECONDS=40 \
#       scripts/gpu-vs-learn2learn.sh ../shared/data/omniglot .gpu /tmp/gpu-dry-run
set -u -o pipefail
device=${DEVICE:-cuda}; configs=${CONFIGS:-5w1s,20w1s}; iters=${ITERS:-10}
maml_seconds=${MAML_SECONDS:-95}; statistician_seconds=${STATISTICIAN_SECONDS:-40}
omniglot=$(realpath "$1"); l2l=$(realpath "$2"); out=$(realpath "$3"); mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export METALEARN_DATA="$omniglot" METALEARN_CACHE="${METALEARN_CACHE:-/tmp/metalearn-cache}"
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi"
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "cpus $(nproc --all)"; } 2>&1 | tee "$out/gpu.txt"
# the Omniglot cache first, in the background: step 3 reads it
python3 -c "from metalearn.data.omniglot import load_omniglot; print('omniglot', load_omniglot().images.shape)" \
    > "$out/train.log" 2>&1 &
prepare=$!
timeout 75 python3 benchmarks/maml_gpu_profile.py --device "$device" --configs "$configs" --gpu-kernels fast \
    --json "$out/maml_gpu_profile.json" 2>&1 | grep -v "^USDT" | tee "$out/maml_step.log" || status=1
# at most 4 timed rounds: the per-task rows take about 1.4 s a step at 20w1s on an H200, so
# 4 rounds of the 11 variants (121 s for both configurations) fit this part's limit and 10 do not
timeout 200 python3 benchmarks/maml_step.py --device "$device" --gpu-kernels fast --configs "$configs" \
    --peer-on-project-torch "$l2l" --extra-rows chunk1 --iters "$(( iters < 4 ? iters : 4 ))" --warmup 1 \
    --json "$out/maml_step_cuda_l2l.json" 2>&1 | tee -a "$out/maml_step.log" || status=1
# the CUDA graph in a process of its own: a capture that fails can leave the CUDA context unusable
timeout 100 python3 benchmarks/maml_step.py --device "$device" --gpu-kernels fast --configs "$configs" \
    --extra-rows graph --iters "$(( iters < 5 ? iters : 5 ))" --warmup 2 \
    --json "$out/maml_step_cuda_graph.json" 2>&1 | tee -a "$out/maml_step.log" || status=1
wait $prepare || status=1
rm -rf /tmp/maml-5w1s-gpu /tmp/statistician-gpu  # fresh runs, also when the script runs again
timeout 130 python3 -m metalearn train maml --dataset omniglot --ways 5 --shots 1 --device "$device" \
    --time-limit "$maml_seconds" --no-progress --run-dir /tmp/maml-5w1s-gpu >> "$out/train.log" 2>&1
code=$?
[ $code -eq 75 ] || { echo "maml train exited with $code (75 expected: stopped at its time limit)"; status=1; }
cp /tmp/maml-5w1s-gpu/metrics.jsonl "$out/train_metrics.jsonl" || status=1
timeout 80 python3 -m metalearn train statistician --dataset omniglot --split vinyals --ways 5 --shots 5 \
    --query 1 --test-shots 1 --test-query 5 --device "$device" --time-limit "$statistician_seconds" --val-every 0 \
    --log-every 10 --no-progress --run-dir /tmp/statistician-gpu >> "$out/train.log" 2>&1
code=$?
[ $code -eq 75 ] || { echo "statistician train exited with $code (75 expected)"; status=1; }
cp /tmp/statistician-gpu/metrics.jsonl "$out/statistician_metrics.jsonl" || status=1
tail -n 4 "$out/train.log"
echo "gpu-vs-learn2learn status $status"
exit $status
