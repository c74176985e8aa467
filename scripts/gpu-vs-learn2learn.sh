#!/usr/bin/env bash
# MAML on a CUDA GPU against learn2learn 0.2.0, and the pace of two full training protocols, in
# one command (docs/performance.md, "learn2learn on the same GPU, launch overhead, the full
# protocol's time"). It measures:
#   1. where a MAML meta-step's time goes on the GPU: kernels launched, their device time, the
#      step's wall time (benchmarks/maml_gpu_profile.py, 5w1s and 20w1s, both orders);
#   2. metalearn against learn2learn 0.2.0 on the same GPU and batch (benchmarks/maml_step.py
#      --extra-rows chunk1), and metalearn's step captured in a CUDA graph (--extra-rows graph,
#      in a process of its own), torch's fast kernels (TF32);
#   3. the full 5-way 1-shot protocol's pace: `metalearn train maml` on Omniglot for 95 s of its
#      60,000 steps (--time-limit), validation included, from which the full run's time follows;
#   4. the Neural Statistician's pace: 40 s of `metalearn train statistician` at its defaults
#      (30 sets a step), from which the time of the published training length follows.
# Each part has its own timeout (75, 200, 100, 130 and 80 s), under 10 minutes in all.
#
# Run from the repository root:
#
#     scripts/gpu-vs-learn2learn.sh OMNIGLOT_DIR L2L_SOURCE OUT_DIR
#
# OMNIGLOT_DIR holds Omniglot's two official archives. L2L_SOURCE is a folder that holds the
# `learn2learn` package folder: learn2learn 0.2.0's sdist unpacked, or the site-packages of a
# venv made by benchmarks/make-peer-venv.sh. It runs on this interpreter's torch through
# benchmarks/_peer_on_project_torch.py, so nothing is installed. To get the sdist's source:
#
#     pip download --no-deps learn2learn==0.2.0 -d L2L_DOWNLOAD
#     tar xzf L2L_DOWNLOAD/learn2learn-0.2.0.tar.gz -C L2L_DOWNLOAD    # L2L_SOURCE: L2L_DOWNLOAD/learn2learn-0.2.0
#
# Uses the python3 on the PATH with the repository's src/ first on PYTHONPATH. OUT_DIR receives
# eight files: gpu.txt (GPU, driver, python, torch, CUDA, cores), maml_gpu_profile.json,
# maml_step_cuda_l2l.json, maml_step_cuda_graph.json, maml_step.log (the three benchmarks'
# output), train.log, train_metrics.jsonl and statistician_metrics.jsonl (the two trainings'
# logs; their run folders are temporary). The exit status is 0 when every part succeeded.
#
# Settings (environment): DEVICE (default cuda), CONFIGS (5w1s,20w1s), ITERS (10; the learn2learn
# comparison times at most 4 rounds, the CUDA graph at most 5), MAML_SECONDS (95),
# STATISTICIAN_SECONDS (40), LOG_EVERY (the trainings' --log-every: 50 for MAML, 10 for the
# Statistician). A dry run on a CPU checks the script itself in a few minutes:
#
#     DEVICE=cpu CONFIGS=5w1s ITERS=1 MAML_SECONDS=20 STATISTICIAN_SECONDS=20 LOG_EVERY=1 \
#         scripts/gpu-vs-learn2learn.sh OMNIGLOT_DIR L2L_SOURCE OUT_DIR
set -u -o pipefail
device=${DEVICE:-cuda}; configs=${CONFIGS:-5w1s,20w1s}; iters=${ITERS:-10}
maml_seconds=${MAML_SECONDS:-95}; statistician_seconds=${STATISTICIAN_SECONDS:-40}
maml_log_every=${LOG_EVERY:-50}; statistician_log_every=${LOG_EVERY:-10}
if [ $# -ne 3 ]; then echo "usage: $0 OMNIGLOT_DIR L2L_SOURCE OUT_DIR" >&2; exit 2; fi
for dir in "$1" "$2"; do [ -d "$dir" ] || { echo "$0: no folder $dir" >&2; exit 2; }; done
[ -d "$2/learn2learn" ] || { echo "$0: $2 holds no learn2learn folder (see the header)" >&2; exit 2; }
omniglot=$(realpath "$1"); l2l=$(realpath "$2"); out=$(realpath "$3"); mkdir -p "$out"
runs=$(mktemp -d "${TMPDIR:-/tmp}/gpu-vs-learn2learn.XXXXXX")  # the two trainings' run folders
trap 'rm -rf -- "$runs"' EXIT
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
# 4 rounds of the 11 variants (121 s for both configurations) fit this part's 200 s and 10 do not
timeout 200 python3 benchmarks/maml_step.py --device "$device" --gpu-kernels fast --configs "$configs" \
    --peer-on-project-torch "$l2l" --extra-rows chunk1 --iters "$(( iters < 4 ? iters : 4 ))" --warmup 1 \
    --json "$out/maml_step_cuda_l2l.json" 2>&1 | tee -a "$out/maml_step.log" || status=1
# the CUDA graph in a process of its own: a capture that fails can leave the CUDA context unusable
timeout 100 python3 benchmarks/maml_step.py --device "$device" --gpu-kernels fast --configs "$configs" \
    --extra-rows graph --iters "$(( iters < 5 ? iters : 5 ))" --warmup 2 \
    --json "$out/maml_step_cuda_graph.json" 2>&1 | tee -a "$out/maml_step.log" || status=1
wait $prepare || status=1
# copy a training's metrics.jsonl to OUT_DIR, or say why there is none
copy_metrics() {
    if [ -f "$1/metrics.jsonl" ]; then cp "$1/metrics.jsonl" "$2" || status=1
    else echo "no $1/metrics.jsonl: the run logged no line in its time (fewer steps than --log-every $3;" \
              "set LOG_EVERY lower)"; status=1; fi
}
timeout 130 python3 -m metalearn train maml --dataset omniglot --ways 5 --shots 1 --device "$device" \
    --time-limit "$maml_seconds" --log-every "$maml_log_every" --no-progress --run-dir "$runs/maml-5w1s" \
    >> "$out/train.log" 2>&1
code=$?
[ $code -eq 75 ] || { echo "maml train exited with $code (75 expected: stopped at its time limit)"; status=1; }
copy_metrics "$runs/maml-5w1s" "$out/train_metrics.jsonl" "$maml_log_every"
timeout 80 python3 -m metalearn train statistician --dataset omniglot --split vinyals --ways 5 --shots 5 \
    --query 1 --test-shots 1 --test-query 5 --device "$device" --time-limit "$statistician_seconds" --val-every 0 \
    --log-every "$statistician_log_every" --no-progress --run-dir "$runs/statistician" >> "$out/train.log" 2>&1
code=$?
[ $code -eq 75 ] || { echo "statistician train exited with $code (75 expected)"; status=1; }
copy_metrics "$runs/statistician" "$out/statistician_metrics.jsonl" "$statistician_log_every"
tail -n 4 "$out/train.log"
echo "gpu-vs-learn2learn status $status"
exit $status
