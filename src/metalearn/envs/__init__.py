"""Reinforcement-learning tasks: Markov decision processes that differ by a task parameter (a
goal position, a goal velocity, a direction), batched over tasks and trajectories.

An environment (:class:`Environment`) steps a whole meta-batch at once: its state is tensors
``(tasks, trajectories, ...)``. A task source (:class:`MDPTasks`) draws the task parameters of a
meta-batch from a seeded generator, as the supervised samplers draw episodes, so that the
trainer, the evaluator and resume treat an MDP batch as they treat a :class:`TaskBatch`; the
method (``maml-rl``) turns a policy into trajectories with :func:`rollout`.
"""

from metalearn.envs.base import Environment, MDPBatch, MDPTasks, Trajectories, rollout

__all__ = ["Environment", "MDPBatch", "MDPTasks", "Trajectories", "rollout"]
