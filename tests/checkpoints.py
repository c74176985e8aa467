"""Comparing the weights that two run directories' checkpoints hold, and a run interrupted and
resumed to compare with one that was not."""

from __future__ import annotations

from typing import Callable

import pytest
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


def interrupted_and_resumed(build: Callable, at_step: int = 2):
    """The trainer ``build()`` makes, killed during step ``at_step + 1`` (a KeyboardInterrupt
    from inside its meta-loss: the checkpoint of step ``at_step`` is what stays, with
    ``checkpoint_every`` dividing it), then ``build(resume=True)`` trained to the end: returns
    that resumed trainer."""
    interrupted = build()
    meta_loss = interrupted.learner.meta_loss

    def killed(batch):
        if interrupted.step == at_step:
            raise KeyboardInterrupt
        return meta_loss(batch)

    interrupted.learner.meta_loss = killed
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(progress=False)
    resumed = build(resume=True)
    assert resumed.step == at_step
    resumed.fit(progress=False)
    return resumed
