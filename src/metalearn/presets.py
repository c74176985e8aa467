"""The papers' hyper-parameters, used as defaults where the user gives none.

One table, so the CLI and the Python API agree, and so a reproduction command is short.
Values are overrides on top of the dataclass defaults, keyed by what the user asked for.
"""

from __future__ import annotations

from typing import Any

from metalearn.config import TaskConfig


def paper_defaults(algorithm: str, task: TaskConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(algorithm config overrides, train config overrides) for ``algorithm`` on ``task``."""
    algo: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if algorithm == "maml":
        if task.dataset in ("sinusoid", "sine-or-line"):
            # Finn et al. 2017, section 5.1 and appendix: alpha 0.01, meta-batch 25, 70k steps.
            algo = {"model": "mlp", "inner_lr": 0.01, "inner_steps": 1, "test_inner_steps": 10}
            train = {"meta_batch_size": 25, "steps": 70000, "val_every": 5000, "checkpoint_every": 5000}
        elif task.ways >= 20:
            # 20-way Omniglot: alpha 0.1, 5 inner steps, meta-batch 16.
            algo = {"model": "conv4", "inner_lr": 0.1, "inner_steps": 5, "test_inner_steps": 5}
            train = {"meta_batch_size": 16, "steps": 60000}
        else:
            # 5-way Omniglot: alpha 0.4, 1 inner step (3 at test time), meta-batch 32.
            algo = {"model": "conv4", "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3}
            train = {"meta_batch_size": 32, "steps": 60000}
    return algo, train
