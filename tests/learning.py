"""A short Omniglot meta-training run for the "it learns" tests of the metric-based methods."""

from __future__ import annotations

import torch


def held_out_accuracy_before_and_after(learner, omniglot, steps: int, tasks_per_step: int = 4,
                                       lr: float = 3e-3) -> tuple[float, float]:
    """Accuracy of ``learner`` on 100 held-out 5-way 1-shot episodes (vinyals test split, 5
    queries per class) before and after ``steps`` Adam steps on training episodes of that shape."""
    from metalearn.data.splits import omniglot_split
    from metalearn.tasks import EpisodeSampler

    images = torch.from_numpy(omniglot.images)
    train_tasks = EpisodeSampler(images, omniglot_split(omniglot, "vinyals", "train"), ways=5, shots=1, query=5)
    test_tasks = EpisodeSampler(images, omniglot_split(omniglot, "vinyals", "test"), ways=5, shots=1, query=5)
    held_out = test_tasks.sample(100, torch.Generator().manual_seed(99))

    def accuracy() -> float:
        return float((learner.predict(held_out).argmax(-1) == held_out.query_y).float().mean())

    before = accuracy()
    optimizer = torch.optim.Adam(learner.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = learner.meta_loss(train_tasks.sample(tasks_per_step, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, accuracy()
