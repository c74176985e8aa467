"""The PLATIPUS Figure 1 picture (Finn, Xu & Levine 2018): for a few ambiguous regression tasks,
the support points, the true function and many sampled adapted functions, beside MAML's
single prediction."""

from __future__ import annotations

from pathlib import Path

import torch

from metalearn.tasks.batch import TaskBatch


def plot_samples(platipus_learner, batch: TaskBatch, true_function, path: Path | str, maml_learner=None,
                 num_samples: int = 20, x_range: tuple[float, float] = (-5.0, 5.0), title: str = "",
                 seed: int = 0, compare_label: str = "MAML") -> Path:
    """One panel per task of ``batch`` (regression): ground truth ``true_function(batch.task_params,
    x)``, the support points, ``num_samples`` sampled and adapted functions (thin lines) of
    ``platipus_learner`` (anything with ``sample_predictions``) and, when given, the prediction
    of ``maml_learner`` (labelled ``compare_label``), on a 200-point grid over ``x_range``. The model noise is seeded by
    ``seed`` (the global generator is left as it was). Returns ``path``."""
    from metalearn.plotting import draw_task_panels, tasks_on_grid
    from metalearn.uncertainty import predictive_samples

    on_grid = tasks_on_grid(batch, true_function, x_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            samples = predictive_samples(platipus_learner, on_grid, num_samples)  # (S, tasks, 200, 1)
            maml = predictive_samples(maml_learner, on_grid)[0] if maml_learner is not None else None

    x = on_grid.query_x[0, :, 0]

    def draw(ax, t):
        for s in range(samples.shape[0]):
            ax.plot(x, samples[s, t, :, 0], color="tab:blue", linewidth=0.7, alpha=0.45,
                    label="PLATIPUS samples" if s == 0 else None)
        if maml is not None:
            ax.plot(x, maml[t, :, 0], color="tab:green", linestyle="--", linewidth=1.6, label=compare_label)

    return draw_task_panels(on_grid, draw, path, title)
