"""maml-rl speed: environment steps per second (nav2d in torch; half-cheetah through gymnasium,
our loop over unwrapped environments against gymnasium's SyncVectorEnv), one meta-step, and
whole meta-iterations against learn2learn's MAML-TRPO example.

    python benchmarks/rl.py --threads 1 --out benchmarks/results/rl_1thread.json
    OMP_NUM_THREADS=1 python benchmarks/rl.py --threads 1 --repeats 1 --meta-iterations 3 \
        --peer-python ~/peer-venv-rl/bin/python --l2l-example ~/l2l-examples/rl/maml_trpo.py \
        --out benchmarks/results/rl_meta_iterations.json

``--meta-iterations N`` times N meta-iterations of ``metalearn train maml-rl --env nav2d`` at the
paper's settings (meta-batch 20, 20 trajectories per task, horizon 100, one policy-gradient
inner step, TRPO with 10 conjugate-gradient iterations): a new meta-batch each time, the
meta-loss, its gradient and the SGD step at rate 1 that applies the TRPO step, as the trainer
does. Each iteration's elapsed time and CPU time (``time.process_time``) are recorded, and the
environment steps per second of the sampling (policy included).

``--peer-python PY --l2l-example FILE`` runs learn2learn's own MAML-TRPO example
(``examples/rl/maml_trpo.py`` of learn2learn's repository, its ``policies.py`` beside it) on its
2D navigation environment with the same meta-batch and trajectories, in that interpreter, through
``benchmarks/_l2l_maml_trpo.py`` (which says what it observes and how). The example needs gym's
old API and cherry-rl 0.1.x, which the peer venv of ``make-peer-venv.sh`` lacks; a venv that
layers them over it (nothing is copied, it reads the peer venv's torch and learn2learn):

    python3 -m venv ~/peer-venv-rl
    echo ~/peer-venv/lib/python3.11/site-packages \
        > ~/peer-venv-rl/lib/python3.11/site-packages/zz_peer_venv.pth
    ~/peer-venv-rl/bin/pip install --no-deps cherry-rl==0.1.4 gym==0.22.0 six dotmap

Timings on a machine shared with other jobs are upper bounds; the CPU times are less moved by
the other jobs than the elapsed ones."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

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
    parser.add_argument("--cheetah-only", action="store_true", help="the half-cheetah timing alone")
    parser.add_argument("--cheetah-batch", default="4x10", metavar="TASKSxTRAJECTORIES",
                        help="environments of the half-cheetah timing (the paper's meta-batch: 40x20)")
    parser.add_argument("--cheetah-meta-iteration", action="store_true",
                        help="also time one whole cheetah-dir meta-iteration at the paper's settings (40 tasks x "
                             "20 trajectories, TRPO): its sampling and the rest")
    parser.add_argument("--meta-iterations", type=int, default=0,
                        help="also time this many whole nav2d meta-iterations (paper's settings)")
    parser.add_argument("--peer-python", default=None,
                        help="interpreter with learn2learn, cherry-rl 0.1.x and gym < 0.23 (see above)")
    parser.add_argument("--l2l-example", default=None, help="learn2learn's examples/rl/maml_trpo.py")
    parser.add_argument("--l2l-iterations", type=int, default=2, help="meta-iterations of the example")
    parser.add_argument("--l2l-workers", type=int, default=10,
                        help="the example's environment processes (num_workers; its default: 10)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.peer_python and not (args.l2l_example and Path(args.l2l_example).is_file()):
        parser.error("--peer-python needs --l2l-example FILE, learn2learn's examples/rl/maml_trpo.py "
                     f"(got {args.l2l_example})")
    torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "threads": args.threads, "processor": processor(), "python": platform.python_version()}
    torch.manual_seed(0)
    if args.cheetah_only:
        args.cheetah = True
    else:
        time_nav2d(args, result)
    if args.cheetah:
        time_cheetah(args, result)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def time_nav2d(args, result: dict) -> None:
    from metalearn.algorithms.maml_rl import MAMLRL, GaussianMLPPolicy
    from metalearn.envs import MDPTasks, rollout
    from metalearn.envs.nav2d import Nav2D

    learner = MAMLRL(GaussianMLPPolicy(2, 2), MAMLRL.Config())
    batch = MDPTasks(Nav2D()).sample(20, torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in learner.policy.named_parameters()}
    seconds = best_of(lambda: learner._rollout(batch, params, False, 20), args.repeats)
    result["nav2d_env_steps_per_s_with_policy"] = 20 * 20 * 100 / seconds
    env = Nav2D()
    seconds = best_of(lambda: rollout(env, batch.params, 20, lambda obs: torch.randn_like(obs)), args.repeats)
    result["nav2d_env_steps_per_s_random_actions"] = 20 * 20 * 100 / seconds
    result["nav2d_meta_step_s"] = best_of(lambda: learner.meta_loss(batch), args.repeats)
    if args.meta_iterations:
        result["nav2d_meta_iterations"] = time_meta_iterations(args.meta_iterations)
    if args.peer_python:
        result["l2l_maml_trpo_particles2d"] = run_l2l_example(args)


def time_cheetah(args, result: dict) -> None:
    """Environment steps per second of random-action rollouts: our loop, then gymnasium's
    SyncVectorEnv over as many environments."""
    import gymnasium
    import numpy as np

    from metalearn.envs import rollout
    from metalearn.envs.cheetah import HalfCheetah, _model_warnings_dropped

    cheetah = HalfCheetah("velocity")
    tasks, trajectories = (int(n) for n in args.cheetah_batch.split("x"))
    horizon = 200
    result["cheetah_batch"] = args.cheetah_batch
    goals = cheetah.sample_tasks(tasks, torch.Generator().manual_seed(0))
    rollout(cheetah, goals, trajectories, lambda obs: torch.zeros(*obs.shape[:2], 6), 1)  # makes the environments
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
    if args.cheetah_meta_iteration:
        result["cheetah_meta_iteration"] = time_cheetah_meta_iteration()


def time_cheetah_meta_iteration() -> dict:
    """One meta-iteration of ``metalearn train maml-rl --env cheetah-dir`` at the paper's
    settings (a meta-batch of 40 tasks, 20 trajectories each, one policy-gradient step, TRPO),
    after an untimed one that makes the 800 environments: elapsed seconds, the sampling's share
    (from the environment steps and their rate) and the rest (adaptation, TRPO)."""
    from metalearn.algorithms.maml_rl import MAMLRL, GaussianMLPPolicy
    from metalearn.envs import MDPTasks
    from metalearn.envs.cheetah import HalfCheetah

    torch.manual_seed(0)
    learner = MAMLRL(GaussianMLPPolicy(17, 6), MAMLRL.Config())
    tasks, generator = MDPTasks(HalfCheetah("direction")), torch.Generator().manual_seed(0)
    times = []
    for _ in range(2):
        batch = tasks.sample(40, generator)
        start = time.perf_counter()
        loss, metrics = learner.meta_loss(batch)
        loss.backward()
        times.append(time.perf_counter() - start)
    env_steps = 2 * 40 * 20 * 200  # the policy's and the adapted policies' trajectories
    sampling = env_steps / float(metrics["env_steps_per_s"])
    return {"meta_iteration_s": times[-1], "sampling_s": sampling, "rest_s": times[-1] - sampling,
            "env_steps_per_s_with_policy": float(metrics["env_steps_per_s"])}


def time_meta_iterations(iterations: int) -> dict:
    """``iterations`` meta-iterations as ``metalearn train maml-rl --env nav2d`` takes them:
    elapsed and CPU seconds of each, and the sampling's environment steps per second."""
    from metalearn.algorithms.maml_rl import MAMLRL, GaussianMLPPolicy
    from metalearn.envs import MDPTasks
    from metalearn.envs.nav2d import Nav2D

    torch.manual_seed(0)
    learner = MAMLRL(GaussianMLPPolicy(2, 2), MAMLRL.Config())
    optimizer = torch.optim.SGD(learner.parameters(), lr=1.0)
    tasks, generator = MDPTasks(Nav2D()), torch.Generator().manual_seed(0)
    sampling = {"seconds": 0.0, "steps": 0}
    rollout = learner._rollout

    def timed_rollout(*args, **kwargs):
        start = time.perf_counter()
        trajectories = rollout(*args, **kwargs)
        sampling["seconds"] += time.perf_counter() - start
        sampling["steps"] += int(trajectories.num_steps)
        return trajectories

    learner._rollout = timed_rollout
    wall, cpu, evaluations = [], [], []
    for _ in range(iterations):
        start, start_cpu = time.perf_counter(), time.process_time()
        batch = tasks.sample(20, generator)
        optimizer.zero_grad()
        loss, metrics = learner.meta_loss(batch)
        loss.backward()
        optimizer.step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        # the objective is evaluated once for the TRPO direction, then once per line-search step
        evaluations.append(1 + min(int(metrics["backtracks"]) + 1, 15))
    return {"meta_batch": 20, "trajectories": 20, "horizon": 100, "cg_iters": learner.config.cg_iters,
            "meta_iteration_wall_s": wall, "meta_iteration_cpu_s": cpu, "objective_evaluations": evaluations,
            "env_steps": sampling["steps"],
            "sampling_s": sampling["seconds"],
            "env_steps_per_s_with_policy": sampling["steps"] / sampling["seconds"]}


def run_l2l_example(args) -> dict:
    """learn2learn's MAML-TRPO example in the peer interpreter (``_l2l_maml_trpo.py``)."""
    command = [args.peer_python, "-W", "ignore", str(Path(__file__).with_name("_l2l_maml_trpo.py")),
               "--example", args.l2l_example, "--iterations", str(args.l2l_iterations),
               "--workers", str(args.l2l_workers), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    except OSError as error:
        sys.exit(f"--peer-python {args.peer_python}: cannot run it ({error.strerror})")
    lines = [line[2:] for line in done.stdout.splitlines() if line.startswith("@@")]
    if done.returncode or not lines:
        sys.exit(f"learn2learn's example failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def processor() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
