#!/usr/bin/env bash
# The Neural Statistician's Omniglot reproduction after training: the four test rows from the one
# trained model (its KL classifier needs no retraining for another number of ways or shots), the
# test lower bound, the learning curves, the conditional-samples picture, new images of an unseen
# character, and results/statistician-omniglot/. Run from the repository root:
#
#     scripts/statistician-omniglot.sh RUN_DIR DRAWINGS_DIR [EPISODES [OUT_DIR]]
#
# RUN_DIR: a trained `metalearn train statistician` run (5-way 1-shot test episodes, 5 queries);
# DRAWINGS_DIR: drawings of one test character (five of Gurmukhi character 42 from
# images_evaluation.zip for the committed picture). Each step is skipped when its output exists,
# so a stopped script continues where it was. Timings go to RUN_DIR/post-times.txt.
set -eu -o pipefail
run=$1; drawings=$2; episodes=${3:-1000}; out=${4:-results/statistician-omniglot}
timed() {  # timed NAME COMMAND...: run it, append its wall time to post-times.txt
    local name=$1; shift
    local start=$(date +%s)
    "$@"
    echo "$name $(( $(date +%s) - start ))s" >> "$run/post-times.txt"
}
# two streams of about equal cost (test images encoded: 5-way 1-shot 30 per episode, 5-way 5-shot
# 50, 20-way 1-shot 40, 20-way 5-shot 120), side by side on a machine with two cores
(
  [ -e "$run/eval.json" ]                         || timed 5w1s  metalearn eval "$run" --episodes "$episodes" --no-progress
  [ -e "$run/eval-shots=5.json" ]                 || timed 5w5s  metalearn eval "$run" --episodes "$episodes" --shots 5 --no-progress
  [ -e "$run/eval-query=1-ways=20.json" ]         || timed 20w1s metalearn eval "$run" --episodes "$episodes" --ways 20 --query 1 --no-progress
) & first=$!
[ -e "$run/eval-query=1-shots=5-ways=20.json" ] || timed 20w5s metalearn eval "$run" --episodes "$episodes" --ways 20 --shots 5 --query 1 --no-progress
wait $first
timed plot metalearn plot "$run"
timed sample metalearn sample "$run" --support "$drawings" --num 20 --out "$run/plots/samples-gurmukhi42.png"
rm -rf "$out" && timed export metalearn export "$run" "$out"
cp "$run/plots/samples-gurmukhi42.png" "$out/"
cat "$run/post-times.txt"
python3 - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"step {s['step']}, training wall time {s['training_wall_time_s'] / 60:.0f} min (meta-steps only)")
for name, e in sorted(s["evaluations"].items(), key=lambda kv: (kv[1]["ways"], kv[1]["shots"])):
    b = e.get("lower_bound", {})
    print(f"{e['ways']}-way {e['shots']}-shot ({e['query']} queries/class, {e['episodes']} episodes): "
          f"{e['mean']:.2f} +/- {e['ci95']:.2f}; test bound {b.get('bound_nats_per_image', float('nan')):.2f} "
          f"nats/image ({b.get('bound_sets')} sets of {e['shots']})  [{name}]")
for v in s.get("validation", []):
    print(f"validation at step {v['step']}: {v['val_accuracy']:.2f} +/- {v['val_ci95']:.2f}")
PY
