"""The batch types of reinforcement learning: an MDP batch (the tasks), trajectories (what a
policy did in them), and the rollout that turns one into the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor


class Environment(Protocol):
    """Dynamics shared by a family of tasks, stepped for a whole meta-batch at once.

    ``state`` is whatever the environment keeps between steps (tensors with leading axes
    ``(tasks, trajectories)``, or simulators); observations, actions, rewards and ``done`` flags
    are tensors ``(tasks, trajectories, ...)``. ``params`` are the task parameters drawn by
    :meth:`sample_tasks`, each with a leading task axis.

    An environment computes in its own floating-point type, its observations' (the built-in
    ones: their task parameters', float32 as drawn): its states, observations and rewards are of
    that type whatever the policy's, and :func:`rollout` hands :meth:`step` the actions converted
    to it. A policy of another type (a float64 or bfloat16 learner) converts the observations to
    its own type and its actions back, so that its type changes its own arithmetic alone, never
    the environment's measurements."""

    name: str
    observation_dim: int
    action_dim: int
    horizon: int  # steps per trajectory unless it terminates before

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> dict[str, Tensor]: ...

    def reset(self, params: dict[str, Tensor], trajectories: int, seeds: Tensor | None = None) -> tuple[Any, Tensor]:
        """(state, first observations ``(tasks, trajectories, observation_dim)``). An environment
        whose start is random draws it from ``seeds`` ``(tasks, trajectories)`` (int64), one per
        episode, when given (the rollout's per-task draws), else from torch's generator."""

    def step(self, state: Any, action: Tensor) -> tuple[Any, Tensor, Tensor, Tensor]:
        """(state, observations, rewards ``(tasks, trajectories)``, done ``(tasks, trajectories)`` bool).
        A ``state`` that is a dict may hold ``"step_info"``: ``{name: (tasks, trajectories) tensor}``,
        values of the step just taken beside its reward (the half-cheetahs' rewarded
        ``velocity``), which :func:`rollout` gathers into :attr:`Trajectories.info`."""


@dataclass(frozen=True)
class MDPBatch:
    """A batch of MDPs: ``env``'s dynamics with one parameter set per task (``params``, each
    tensor ``(tasks, ...)``, e.g. ``goal: (tasks, 2)``). The counterpart of a supervised
    :class:`~metalearn.tasks.batch.TaskBatch` for the trainer and the evaluator: it moves to a
    device, selects tasks, and names its score (``metric``: the average return).

    ``seeds`` ``(tasks,)`` (int64, on the CPU): one seed per task, from which every random draw
    of that task's rollouts comes (:meth:`generators`), so that a task's trajectories depend on
    the task alone, not on which other tasks share its batch or its torchrun rank."""

    env: Any
    params: dict[str, Tensor] = field(default_factory=dict)
    seeds: Tensor | None = None

    metric = "return"

    @property
    def num_tasks(self) -> int:
        """The number of MDPs in the batch."""
        return next(iter(self.params.values())).shape[0]

    @property
    def is_classification(self) -> bool:
        """Always False: MDPs are scored by return."""
        return False

    def to(self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> "MDPBatch":
        """The batch with its task parameters on ``device`` and, the floating-point ones, of
        ``dtype`` (``batch.to(torch.float64)`` works too); the seeds are kept."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        move = lambda t: t.to(device=device, dtype=dtype if torch.is_floating_point(t) else None)
        return MDPBatch(self.env, {k: move(v) for k, v in self.params.items()}, self.seeds)

    def select(self, tasks: slice | Tensor) -> "MDPBatch":
        """The MDPs ``tasks`` (a slice or an index tensor) of the batch, with their seeds."""
        seeds = None if self.seeds is None else self.seeds[tasks]
        return MDPBatch(self.env, {k: v[tasks] for k, v in self.params.items()}, seeds)

    def generators(self, device: torch.device | str = "cpu") -> list[torch.Generator]:
        """One generator per task on ``device``, seeded from ``seeds`` (a batch built without them
        draws its seeds from torch's generator now)."""
        seeds = self.seeds if self.seeds is not None else torch.randint(0, 2**62, (self.num_tasks,))
        return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


class MDPTasks:
    """The task source of an environment: ``sample(num_tasks, generator, tasks)`` draws the
    parameters of ``num_tasks`` MDPs from ``generator``, then a seed per MDP for its rollouts,
    and keeps the slice ``tasks`` of them (a torchrun rank's share), so that every rank draws the
    same meta-batch and each task the same trajectories as in one process."""

    def __init__(self, env: Environment):
        self.env = env

    def sample(self, num_tasks: int, generator: torch.Generator, tasks: slice | None = None) -> MDPBatch:
        """``num_tasks`` MDPs and their rollout seeds, drawn from ``generator`` alone; with
        ``tasks``, only that slice of them (see the class docstring)."""
        params = self.env.sample_tasks(num_tasks, generator)
        batch = MDPBatch(self.env, params, torch.randint(0, 2**62, (num_tasks,), generator=generator))
        return batch if tasks is None else batch.select(tasks)


@dataclass(frozen=True)
class Trajectories:
    """What a policy did in a batch of MDPs, padded to the horizon ``H``:

    observations: (tasks, trajectories, H, observation_dim), the observation each action saw
    actions:      (tasks, trajectories, H, action_dim), as the policy drew them (before any clipping), in the
                  observations' type (what the environment was given)
    rewards:      (tasks, trajectories, H), 0 after termination
    mask:         (tasks, trajectories, H), 1 up to and including the step that terminated
    info:         {name: (tasks, trajectories, H)}, what the environment reported of each step
                  beside its reward (``state["step_info"]``, see :meth:`Environment.step`); empty for most
    """

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        """Environment steps taken (unmasked)."""
        return int(self.mask.sum())

    def returns(self) -> Tensor:
        """Undiscounted return of each trajectory, (tasks, trajectories)."""
        return self.rewards.sum(-1)

    def rewards_to_go(self, discount: float) -> Tensor:
        """Discounted return from each step on, (tasks, trajectories, H)."""
        out = torch.zeros_like(self.rewards)
        running = torch.zeros_like(self.rewards[..., 0])
        for t in range(self.rewards.shape[-1] - 1, -1, -1):
            running = self.rewards[..., t] + discount * running
            out[..., t] = running
        return out


def rollout(env: Environment, params: dict[str, Tensor], trajectories: int, act: Callable[[Tensor], Tensor],
            horizon: int | None = None, reset_seeds: Tensor | None = None) -> Trajectories:
    """Run ``trajectories`` episodes in each MDP of ``params`` with the policy ``act``
    (observations ``(tasks, trajectories, observation_dim)`` -> actions ``(tasks, trajectories,
    action_dim)``, sampled), one batched step for the whole batch per time step. An episode that
    terminates is masked from then on (the environment keeps stepping it: one tensor op for all).
    ``reset_seeds`` ``(tasks, trajectories)``: the seeds of a random start (:meth:`Environment.reset`).
    Everything is kept in the environment's type, its first observations' (see :class:`Environment`):
    actions of another type are converted to it before they reach :meth:`Environment.step`, and the
    rewards, the mask and so the returns are of it."""
    horizon = env.horizon if horizon is None else horizon
    state, obs = env.reset(params, trajectories) if reset_seeds is None else env.reset(params, trajectories,
                                                                                         reset_seeds)
    alive = torch.ones(obs.shape[:2], dtype=obs.dtype, device=obs.device)
    observations, actions, rewards, masks, info = [], [], [], [], {}
    for _ in range(horizon):
        action = act(obs).to(obs.dtype)  # the environment's type, whatever the policy computed in
        state, next_obs, reward, done = env.step(state, action)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward.to(obs.dtype) * alive)
        masks.append(alive)
        for name, value in (state.get("step_info", {}) if isinstance(state, dict) else {}).items():
            info.setdefault(name, []).append(value)
        alive = alive * (~done).to(obs.dtype)
        obs = next_obs
    return Trajectories(torch.stack(observations, 2), torch.stack(actions, 2), torch.stack(rewards, 2),
                        torch.stack(masks, 2), {name: torch.stack(values, 2) for name, values in info.items()})
