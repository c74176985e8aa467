"""maml-rl speed: environment steps per second (nav2d in torch; half-cheetah through gymnasium,
our loop over unwrapped environments against gymnasium's SyncVectorEnv) and one meta-step.

    python benchmarks/rl.py --threads 1 --out benchmarks/results/rl_1thread.json

Timings on a machine shared with other jobs are upper bounds."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cheetah", action="store_true", help="also the half-cheetah (needs the rl extra)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from metalearn.algorithms.maml_rl import MAMLRL, GaussianMLPPolicy
    from metalearn.envs import MDPTasks, rollout
    from metalearn.envs.nav2d import Nav2D

    result = {"torch": torch.__version__, "threads": args.threads, "processor": processor(), "python": platform.python_version()}
    torch.manual_seed(0)
    learner = MAMLRL(GaussianMLPPolicy(2, 2), MAMLRL.Config())
    batch = MDPTasks(Nav2D()).sample(20, torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in learner.policy.named_parameters()}
    seconds = best_of(lambda: learner._rollout(batch, params, False, 20), args.repeats)
    result["nav2d_env_steps_per_s_with_policy"] = 20 * 20 * 100 / seconds
    env = Nav2D()
    seconds = best_of(lambda: rollout(env, batch.params, 20, lambda obs: torch.randn_like(obs)), args.repeats)
    result["nav2d_env_steps_per_s_random_actions"] = 20 * 20 * 100 / seconds
    result["nav2d_meta_step_s"] = best_of(lambda: learner.meta_loss(batch), args.repeats)

    if args.cheetah:
        import gymnasium
        import numpy as np

        from metalearn.envs.cheetah import HalfCheetah, _model_warnings_dropped

        cheetah = HalfCheetah("velocity")
        tasks, trajectories, horizon = 4, 10, 200
        goals = cheetah.sample_tasks(tasks, torch.Generator().manual_seed(0))
        seconds = best_of(lambda: rollout(cheetah, goals, trajectories, lambda obs: torch.randn(*obs.shape[:2], 6),
                                          horizon), args.repeats)
        result["cheetah_env_steps_per_s_loop"] = tasks * trajectories * horizon / seconds
        with _model_warnings_dropped():
            vector = gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("HalfCheetah-v5")] * (tasks * trajectories))
        vector.reset(seed=0)

        def vector_rollout():
            for _ in range(horizon):
                vector.step(np.random.uniform(-1, 1, (tasks * trajectories, 6)))

        seconds = best_of(vector_rollout, args.repeats)
        result["cheetah_env_steps_per_s_sync_vector_env"] = tasks * trajectories * horizon / seconds

    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def processor() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
