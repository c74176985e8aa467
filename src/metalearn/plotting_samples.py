"""Pictures of samples. A picture like the PLATIPUS paper's figure of sampled regressors (Finn,
Xu & Levine 2018): for a few ambiguous regression tasks, the support points, the true function
and many sampled adapted functions, beside MAML's single prediction; and grids of images with
new images of a character beneath them (the Neural Statistician's conditional samples)."""

from __future__ import annotations

from pathlib import Path

import torch

from metalearn.runtime import own_random_state
from metalearn.tasks.batch import TaskBatch


def plot_samples(learner, batch: TaskBatch, true_function, path: Path | str, other_learner=None,
                 num_samples: int = 20, x_range: tuple[float, float] = (-5.0, 5.0), title: str = "",
                 seed: int = 0, compare_label: str = "MAML") -> Path:
    """One panel per task of ``batch`` (regression): ground truth ``true_function(batch.task_params,
    x)``, the support points, ``num_samples`` sampled and adapted functions (thin lines, labelled
    with the class's name: "PLATIPUS samples") of ``learner`` (a method that samples models:
    ``sample_predictions``) and, when given, the prediction of ``other_learner`` (labelled
    ``compare_label``), on a 200-point grid over ``x_range``. The model noise is seeded by
    ``seed`` (the global generator is left as it was). Returns ``path``."""
    from metalearn.plotting import draw_task_panels, tasks_on_grid
    from metalearn.uncertainty import predictive_samples

    on_grid = tasks_on_grid(batch, true_function, x_range)
    with own_random_state([]):
        torch.manual_seed(seed)
        with torch.no_grad():
            samples = predictive_samples(learner, on_grid, num_samples)  # (S, tasks, 200, 1)
            other = predictive_samples(other_learner, on_grid)[0] if other_learner is not None else None

    x = on_grid.query_x[0, :, 0]

    def draw(ax, t):
        for s in range(samples.shape[0]):
            ax.plot(x, samples[s, t, :, 0], color="tab:blue", linewidth=0.7, alpha=0.45,
                    label=f"{type(learner).__name__} samples" if s == 0 else None)
        if other is not None:
            ax.plot(x, other[t, :, 0], color="tab:green", linestyle="--", linewidth=1.6, label=compare_label)

    return draw_task_panels(on_grid, draw, path, title)


def plot_image_rows(entries: list[tuple[torch.Tensor, str | None]], path: Path | str, width: int | None = None,
                    title: str = "") -> Path:
    """Images as a PNG grid: each entry (images (k, 1, H, W) in [0, 1], label or None) starts a
    new row and fills rows of ``width`` images (default: the first entry's count, at least 10
    where a later entry has that many); a grey line parts one entry from the next. Strokes are
    drawn dark on white, as on paper. Returns ``path``."""
    from metalearn.plotting import _figures, save_figure

    if width is None:
        width = max(entries[0][0].shape[0], min(10, max(images.shape[0] for images, _ in entries)))
    h, w = entries[0][0].shape[-2:]
    pad = 2
    blocks, labels, top = [], [], 0
    for images, label in entries:
        rows = -(-images.shape[0] // width)
        block = torch.ones(rows * (h + pad) + pad, width * (w + pad) + pad)
        for i, image in enumerate(images.detach().float().cpu()):
            r, c = divmod(i, width)
            block[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = \
                1.0 - image[0].clamp(0, 1)
        blocks += [block, torch.full((1, block.shape[1]), 0.6)]
        labels.append((top + block.shape[0] / 2, label))
        top += block.shape[0] + 1
    canvas = torch.cat(blocks[:-1])
    plt = _figures()
    scale = 0.022
    fig, ax = plt.subplots(figsize=(max(canvas.shape[1] * scale, 3) + 0.8, canvas.shape[0] * scale + 0.6))
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    named = [(y, label) for y, label in labels if label]  # as tick labels, which tight_layout makes room for
    ax.set_yticks([y for y, _ in named], [label for _, label in named], fontsize=7)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=8)
    return save_figure(fig, path, dpi=130)
