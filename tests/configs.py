"""Run configurations that several test files train."""

from __future__ import annotations

from metalearn.api import resolve_config


def sinusoid_config(steps: int, **train):
    return resolve_config(
        "maml",
        task={"dataset": "sinusoid", "shots": 5},
        method_config={"test_inner_steps": 2},
        train={"steps": steps, "meta_batch_size": 4, "log_every": 2, "val_every": 3, "val_episodes": 8,
               "checkpoint_every": 2, "eval_episodes": 20, **train},
    )
