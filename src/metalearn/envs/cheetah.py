"""Half-cheetah with a goal velocity or a goal direction, the locomotion tasks of MAML's
reinforcement-learning experiments (Finn, Abbeel & Levine 2017, section 5.3 and appendix A.2),
on MuJoCo through gymnasium's ``HalfCheetah-v5`` (the optional extra ``pip install -e ".[rl]"``).

Rewards as the paper's appendix and the authors' code (``HalfCheetahEnvRand``,
``HalfCheetahEnvRandDirec``) define them, with v the forward velocity and a the action clipped
to [-1, 1]:

- ``velocity`` (cheetah-vel): goal velocity g uniform in [0, 2]; reward -|v - g| - 0.05 |a|^2;
- ``direction`` (cheetah-dir): forward or backward with probability 1/2 each (d = +-1);
  reward d v - 0.05 |a|^2.

Horizon 200, no termination. What differs from the paper's rllab model: gymnasium's
half-cheetah (its MuJoCo model file and version, its 17 observations: joint positions without
the x coordinate, and velocities; rllab's added the torso's centre of mass), v is the root's
x velocity (rllab's: the torso's centre-of-mass velocity), gymnasium's reset noise (uniform in
+-0.1 on the positions; rllab's: normal, standard deviation 0.01), and the control period: gymnasium
holds each action for 5 MuJoCo steps of 0.01 s (``frame_skip`` 5, 0.05 s), where rllab's model file
sets no frame skip, so that its policy acted every 0.01 s; the 200 steps of an episode are 10 s of
simulated time here, 2 s in the paper. tristandeleu/pytorch-maml-rl makes the same choice (its
``maml_rl/envs/mujoco/half_cheetah.py`` subclasses gym's ``HalfCheetahEnv``, frame skip 5). Returns
are therefore comparable in kind, not to the decimal.

v is the root's x displacement over a step's ``frame_skip`` simulator steps divided by their
duration (gymnasium's ``info["x_velocity"]``), not the velocity qvel[0] that the observation holds
at the end of the step. Each step reports its v as ``state["step_info"]["velocity"]``, which the
rollout keeps in :attr:`Trajectories.info <metalearn.envs.Trajectories>` and the velocity plot
draws.

The simulators are stepped by a Python loop over the meta-batch's tasks x trajectories
(``tasks * trajectories`` environments kept between calls), split among torch's threads
(``torch.get_num_threads()``, ``OMP_NUM_THREADS``): MuJoCo's step is C and releases the GIL.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from metalearn.errors import MetalearnError

# the rl extra's requirement, which also installs outside a clone of metalearn
INSTALL = 'pip install "gymnasium[mujoco]>=1.0" (in a clone of metalearn: pip install -e ".[rl]")'


def _gymnasium():
    try:
        import gymnasium
        import mujoco  # noqa: F401  (gymnasium's MuJoCo environments need it)
    except ImportError:
        raise MetalearnError(f"the half-cheetah environments need MuJoCo through gymnasium, which is not installed: "
                             f"{INSTALL}") from None
    return gymnasium


@contextlib.contextmanager
def _model_warnings_dropped():
    """MuJoCo's warnings dropped meanwhile. MuJoCo 4.0.0 warns that gymnasium 1.4.0's
    half_cheetah.xml uses the deprecated 'settotalmass' every time the model is compiled, once per
    environment, on stderr and into MUJOCO_LOG.TXT in the working directory; a handler of our
    own, set only while the models compile, keeps both quiet."""
    import mujoco

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(lambda message: None)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


_POOLS: dict[int, ThreadPoolExecutor] = {}
# a forked child has none of its parent's threads: it makes pools of its own
os.register_at_fork(after_in_child=_POOLS.clear)


def _threads(count: int) -> ThreadPoolExecutor:
    """A pool of ``count`` threads, made once per size and kept for the process."""
    if count not in _POOLS:
        _POOLS[count] = ThreadPoolExecutor(count, thread_name_prefix="metalearn-mujoco")
    return _POOLS[count]


class HalfCheetah:
    """``goal``: "velocity" (cheetah-vel) or "direction" (cheetah-dir)."""

    observation_dim = 17
    action_dim = 6
    horizon = 200
    control_cost = 0.05  # 0.1 * 0.5 |a|^2 in the authors' code
    positions = False
    forward_velocity_index = 8  # in an observation (qpos[1:], qvel): qvel[0], the root's x velocity
    forward_velocity_info = "velocity"  # in Trajectories.info: the v of each step's reward, which the plot draws
    envs_per_thread = 16  # fewer environments than this per thread are stepped by one thread

    def __init__(self, goal: str = "velocity"):
        if goal not in ("velocity", "direction"):
            raise MetalearnError(f"half-cheetah goal must be velocity or direction, got {goal!r}")
        self.goal = goal
        self.name = "cheetah-vel" if goal == "velocity" else "cheetah-dir"
        self._gym = _gymnasium()
        import mujoco

        self._mujoco = mujoco
        self._pool: list = []

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> dict[str, Tensor]:
        if self.goal == "velocity":
            return {"velocity": torch.rand(num_tasks, generator=generator, dtype=torch.float64).float() * 2.0}
        forward = torch.rand(num_tasks, generator=generator, dtype=torch.float64) >= 0.5
        return {"direction": forward.float() * 2.0 - 1.0}

    def _environments(self, count: int) -> list:
        while len(self._pool) < count:
            with _model_warnings_dropped():
                self._pool.append(self._gym.make("HalfCheetah-v5").unwrapped)
        return self._pool[:count]

    def reset(self, params: dict[str, Tensor], trajectories: int, seeds: Tensor | None = None):
        goal = params["velocity" if self.goal == "velocity" else "direction"]
        tasks = goal.shape[0]
        envs = self._environments(tasks * trajectories)
        # gymnasium's reset noise: from the rollout's per-task seeds, else torch's generator
        seeds = torch.randint(0, 2**31 - 1, (len(envs),)) if seeds is None else seeds.reshape(-1) % (2**31 - 1)
        seeds = seeds.tolist()
        observations = np.stack([env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)])
        obs = torch.as_tensor(observations, dtype=goal.dtype, device=goal.device).view(tasks, trajectories, -1)
        return {"envs": envs, "goal": goal[:, None]}, obs

    def _simulate(self, envs: list, actions: np.ndarray, observations: np.ndarray, velocities: np.ndarray,
                  rows: range) -> None:
        """gymnasium's ``HalfCheetah-v5.step`` for the environments ``rows``, its Python around
        MuJoCo's step left out (a third of the sampling time): the control, ``frame_skip``
        simulator steps, the root's x velocity over them, the observation qpos[1:], qvel,
        written into those rows. The same numbers to the bit (tested); what it leaves out,
        ``mj_rnePostConstraint``'s force quantities, nothing here reads."""
        simulate = self._mujoco.mj_step
        positions = envs[0].model.nq - 1  # qpos without the root's x
        for i in rows:
            env = envs[i]
            data = env.data
            before = data.qpos[0]
            data.ctrl[:] = actions[i]
            simulate(env.model, data, nstep=env.frame_skip)
            velocities[i] = (data.qpos[0] - before) / env.dt
            observations[i, :positions], observations[i, positions:] = data.qpos[1:], data.qvel

    def step(self, state, action: Tensor):
        envs, goal = state["envs"], state["goal"]
        tasks, trajectories = action.shape[:2]
        # observations, velocities and rewards in the environment's type, the goals' (float32 as drawn),
        # whatever the action's (a float64 or bfloat16 policy's); MuJoCo simulates in float64 either way
        dtype = goal.dtype
        clipped = action.to(dtype).clamp(-1.0, 1.0)  # an infinite action is clipped to the bound; NaN stays NaN
        # a NaN action (a diverged policy) never reaches MuJoCo, which would warn on stderr and write
        # MUJOCO_LOG.TXT into the working directory: its simulator is driven by 0 instead, and the
        # reward, computed from the action itself, is NaN, so the divergence still shows in the
        # return (the trainer stops on the NaN meta-loss it gives)
        actions = torch.nan_to_num(clipped.detach(), nan=0.0).reshape(len(envs), -1).cpu().double().numpy()
        observations, velocities = np.empty((len(envs), self.observation_dim)), np.empty(len(envs))
        # torch's threads step the simulators while torch waits for them: MuJoCo's step releases
        # the GIL; each thread steps its own environments, so the numbers do not depend on it
        threads = min(torch.get_num_threads(), len(envs) // self.envs_per_thread)
        if threads > 1:
            bounds = np.linspace(0, len(envs), threads + 1).astype(int)
            list(_threads(threads).map(lambda k: self._simulate(envs, actions, observations, velocities,
                                                                range(bounds[k], bounds[k + 1])), range(threads)))
        else:
            self._simulate(envs, actions, observations, velocities, range(len(envs)))
        obs = torch.as_tensor(observations, dtype=dtype, device=action.device)
        velocity = torch.as_tensor(velocities, dtype=dtype, device=action.device).view(tasks, trajectories)
        state["step_info"] = {"velocity": velocity}  # the v of this step's reward: Trajectories.info
        cost = self.control_cost * clipped.square().sum(-1)
        progress = -(velocity - goal).abs() if self.goal == "velocity" else goal * velocity
        done = torch.zeros(tasks, trajectories, dtype=torch.bool, device=action.device)
        return state, obs.view(tasks, trajectories, -1), progress - cost, done
