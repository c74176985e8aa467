"""A reinforcement-learning environment of your own, as a metalearn plugin: a point on a line that
walks to its task's goal. Name this file in METALEARN_PLUGINS and every metalearn process knows
the environment ``walk-to-goal``:

    METALEARN_PLUGINS=examples/walk_to_goal.py metalearn train maml-rl --env walk-to-goal --run-dir runs/walk
    METALEARN_PLUGINS=examples/walk_to_goal.py metalearn eval runs/walk
"""

import torch

import metalearn


class WalkToGoal:
    """Observation: the position; action: a step, clipped to 0.2; reward: minus the distance to
    the task's goal after the step. Ten steps, every task and trajectory stepped at once."""

    observation_dim, action_dim, horizon = 1, 1, 10

    def sample_tasks(self, num_tasks, generator):             # each task: a goal in [-1, 1]
        return {"goal": torch.rand(num_tasks, 1, generator=generator) * 2 - 1}

    def reset(self, params, trajectories, seeds=None):         # every walk starts at 0
        position = torch.zeros(params["goal"].shape[0], trajectories, 1)
        return (position, params["goal"]), position

    def step(self, state, action):
        position, goal = state
        position = position + action.clamp(-0.2, 0.2)
        reward = -(position - goal[:, None]).abs().squeeze(-1)  # minus the distance to the goal
        return (position, goal), position, reward, torch.zeros_like(reward, dtype=torch.bool)


metalearn.register_environment("walk-to-goal", WalkToGoal)
