"""2D navigation, the point-robot tasks of MAML's reinforcement-learning experiments (Finn,
Abbeel & Levine 2017, section 5.3), in torch, batched over tasks and trajectories.

A point starts at the origin and moves by its action each step; a task is a goal drawn
uniformly from the square [-0.5, 0.5]^2. As in the authors' code (``PointEnvRandGoal`` behind
rllab's ``normalize``): the policy's action ``a`` is scaled to a velocity ``0.1 a`` and clipped
to [-0.1, 0.1] per coordinate; the reward of a step is minus the Euclidean distance from the new
position to the goal; an episode ends after 100 steps, or at the step that brings the point
within 0.01 of the goal in both coordinates. The observation is the position. Positions,
distances and rewards are computed in the goals' type (float32 as drawn), whatever the action's.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Nav2D:
    """Point navigation to a goal in the plane, stepped for ``(tasks, trajectories)`` at once."""

    name = "nav2d"
    observation_dim = 2
    action_dim = 2
    horizon = 100
    max_speed = 0.1       # the velocity bound per coordinate
    goal_range = 0.5      # goals uniform in [-goal_range, goal_range]^2
    tolerance = 0.01      # done when within this of the goal in both coordinates
    positions = True      # observations are positions in the plane (plots draw them)

    def sample_tasks(self, num_tasks: int, generator: torch.Generator) -> dict[str, Tensor]:
        goal = (torch.rand(num_tasks, 2, generator=generator, dtype=torch.float64) * 2 - 1) * self.goal_range
        return {"goal": goal.float()}

    def reset(self, params: dict[str, Tensor], trajectories: int,
              seeds: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        # every episode starts at the origin: nothing to draw from ``seeds``
        goal = params["goal"]
        position = goal.new_zeros(goal.shape[0], trajectories, 2)
        return {"position": position, "goal": goal[:, None, :]}, position

    def step(self, state: dict[str, Tensor], action: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        # in the environment's type: an action of another type (a float64 or bfloat16 policy's) would
        # otherwise carry the position, the done test and the reward into its own
        action = action.to(state["position"].dtype)
        velocity = (self.max_speed * action).clamp(-self.max_speed, self.max_speed)
        position = state["position"] + velocity
        offset = position - state["goal"]
        reward = -offset.norm(dim=-1)
        done = (offset.abs() < self.tolerance).all(-1)
        return {"position": position, "goal": state["goal"]}, position, reward, done
