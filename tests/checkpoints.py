"""Comparing the weights that two run directories' checkpoints hold."""

from __future__ import annotations

import torch

from metalearn.runs import RunDir


def weights(run_dir) -> dict[str, torch.Tensor]:
    return RunDir(run_dir).read_checkpoint()["learner"]


def assert_same_weights(a, b, atol: float = 1e-6) -> None:
    """Every tensor of the two checkpoints' learners equal to ``atol``; checkpoints hold CPU
    tensors, whatever device the run trained on, so that they load anywhere."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].device.type == "cpu" and wb[name].device.type == "cpu", name
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
