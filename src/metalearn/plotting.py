"""Pictures of a run: learning curves, and for regression the MAML Figure 2 picture (true
function, the K support points, the prediction after 0, 1 and 10 adaptation steps)."""

from __future__ import annotations

from pathlib import Path

import torch

from metalearn.algorithms import MetaLearner
from metalearn.errors import MetalearnError
from metalearn.files import atomic_write_bytes
from metalearn.tasks.batch import TaskBatch


def save_figure(fig, path: Path | str, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (its folder made if missing), close it.
    The PNG is rendered in memory and renamed into place (:func:`atomic_write_bytes`): a plot
    killed half-way leaves the previous picture, never a truncated one."""
    import io

    fit_titles(fig)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    _figures().close(fig)
    atomic_write_bytes(path, buffer.getbuffer())
    return path


def fit_titles(fig) -> None:
    """Wrap the figure's title and each panel's title onto more lines where a line is wider than
    the figure or the panel: matplotlib draws a title on one line and cuts it at the figure's edge
    (a run folder's name or a long note in a title), and ``tight_layout`` makes room above a
    title, not beside it."""
    import textwrap

    renderer = fig.canvas.get_renderer()
    suptitle = fig.get_suptitle() and fig._suptitle  # the Text; get_suptitle gives its string alone
    texts = [(suptitle, fig.bbox.width)] if suptitle else []
    texts += [(ax.title, ax.bbox.width) for ax in fig.axes if ax.get_title()]
    for text, room in texts:
        lines = text.get_text().split("\n")
        per_line = max(map(len, lines))
        width = text.get_window_extent(renderer).width
        for _ in range(8):  # characters differ in width: narrow the lines until the widest fits
            if width <= room or per_line <= 12:
                break
            per_line = max(12, min(per_line - 1, int(per_line * 0.95 * room / width)))
            # a run folder's name holds hyphens: lines break at spaces, and within a word only
            # where the word is longer than a line
            text.set_text("\n".join(textwrap.fill(line, per_line, break_on_hyphens=False) for line in lines))
            width = text.get_window_extent(renderer).width


class _Figures:
    """pyplot's ``subplots`` and ``close`` for the figures metalearn draws, which are only ever
    saved: ``matplotlib.figure.Figure`` objects, rendered by Agg when saved, outside pyplot. Using
    pyplot would mean choosing its backend for the whole process (``matplotlib.use("Agg")``),
    which takes a notebook's inline figures away from the user's own plots."""

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **options):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)  # the figure's canvas: text is measured (fit_titles) and saved with Agg
        return fig, fig.subplots(nrows, ncols, **options)

    @staticmethod
    def close(fig) -> None:
        """Nothing to do: pyplot never held the figure, which goes with its last reference."""


def _figures() -> type[_Figures]:
    return _Figures


SERIES_LABELS = {  # metrics.jsonl key -> (factor, panel title)
    "loss": (1.0, "training loss (meta-batch)"),
    "accuracy": (100.0, "training accuracy (%, meta-batch)"),
    "val_accuracy": (1.0, "validation accuracy (%)"),
    "val_mse": (1.0, "validation MSE"),
    "return": (1.0, "average return before adapting (meta-batch)"),
    "return_adapted": (1.0, "average return after adapting (meta-batch)"),
    "val_return": (1.0, "validation return after adapting"),
    "kl": (1.0, "KL of the meta-update"),
}
# diagnostics kept in metrics.jsonl but not drawn
UNDRAWN = ("step", "tasks_per_s", "val_ci95", "elapsed_s", "env_steps_per_s", "backtracks", "step_s",
           "validation_s")


def axis_limits(values: list[float], spread: float = 5.0) -> tuple[float, float, int] | None:
    """(low, high, points outside) of a y-axis that leaves out rare spikes: the 5th-95th
    percentile range padded by half its width on each side, when the whole range is more than ``spread`` times
    wider (a single step's spike, such as a Neural Statistician's KL of thousands of nats, would
    otherwise flatten the rest of the curve into a line); None when every point fits."""
    finite = torch.tensor([v for v in values if v == v and abs(v) != float("inf")], dtype=torch.float64)
    if finite.numel() < 20:
        return None
    low, high = (float(q) for q in torch.quantile(finite, torch.tensor([0.05, 0.95], dtype=torch.float64)))
    if float(finite.max() - finite.min()) <= spread * max(high - low, 1e-12):
        return None
    # half the range; where most points are one value (an accuracy at 100% but for a few steps), a
    # little room about it, since matplotlib warns of an axis of no height
    pad = 0.5 * (high - low) if high > low else 0.05 * max(abs(high), 1e-3)
    low, high = low - pad, high + pad
    return low, high, int(((finite < low) | (finite > high)).sum())


def plot_learning_curves(records: list[dict], path: Path, title: str = "",
                         labels: dict[str, str] | None = None) -> Path:
    """Training loss and every accuracy/MSE series found in ``metrics.jsonl`` records;
    ``labels``: panel titles that replace the common ones (:meth:`MetaLearner.series_labels`)."""
    plt = _figures()
    # a value that is not a number (a hand-edited or foreign line) is skipped, as status skips it
    number = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    records = [{k: v for k, v in r.items() if k == "step" or number(v)} for r in records if number(r.get("step"))]
    series = sorted({k for r in records for k in r if k not in UNDRAWN})
    if not series:  # records of nothing drawable (a foreign or hand-edited metrics.jsonl)
        raise MetalearnError("the metrics hold no series to draw (no loss, accuracy or MSE with a step)")
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * max(len(series), 1), 3.5), squeeze=False)
    for ax, name in zip(axes[0], series):
        # metrics.jsonl keeps training accuracy as a fraction and validation accuracy in percent
        scale, label = SERIES_LABELS.get(name, (1.0, name))
        label = (labels or {}).get(name, label)
        points = [(r["step"], r[name] * scale) for r in records if name in r]
        sparse = name.startswith("val") or len(points) < 20  # a line of one point draws nothing
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if sparse else None)
        ax.set_xlabel("meta-step")
        ax.set_title(label)
        if name in ("loss", "kl") and all(p[1] > 0 for p in points):
            ax.set_yscale("log")
        elif (limits := axis_limits([p[1] for p in points])) is not None:
            ax.set_ylim(limits[0], limits[1])
            ax.set_title(f"{label} ({limits[2]} of {len(points)} points off the axis)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def tasks_on_grid(batch: TaskBatch, true_function, x_range: tuple[float, float] = (-5.0, 5.0),
                  points: int = 200) -> TaskBatch:
    """The regression tasks of ``batch`` with ``points`` evenly spaced query inputs over
    ``x_range`` and the true function there as query targets, for drawing whole curves."""
    grid = torch.linspace(*x_range, points).view(1, -1, 1).expand(batch.num_tasks, -1, -1).contiguous()
    truth = true_function(batch.task_params, grid)
    return TaskBatch(batch.support_x, batch.support_y, grid, truth, 0, batch.task_params)


def draw_task_panels(on_grid: TaskBatch, draw_predictions, path: Path, title: str = "") -> Path:
    """One panel per task: ``draw_predictions(ax, t)`` draws the method's curves, then the truth
    and the support points are added; saved as PNG at ``path``."""
    plt = _figures()
    fig, axes = plt.subplots(1, on_grid.num_tasks, figsize=(4.2 * on_grid.num_tasks, 3.4), squeeze=False)
    x = on_grid.query_x[0, :, 0]
    for t, ax in enumerate(axes[0]):
        draw_predictions(ax, t)
        ax.plot(x, on_grid.query_y[t, :, 0], color="tab:red", linewidth=1.8, label="ground truth")
        ax.scatter(on_grid.support_x[t, :, 0], on_grid.support_y[t, :, 0], color="black", zorder=5,
                   label=f"{on_grid.support_x.shape[1]} points")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_regression_fits(learner: MetaLearner, batch: TaskBatch, true_function, path: Path,
                         steps_to_show: tuple[int, ...] = (0, 1, 10), title: str = "",
                         x_range: tuple[float, float] = (-5.0, 5.0)) -> Path:
    """For each task of ``batch``: the true function, the support points and the predictions
    after ``steps_to_show`` adaptation steps, on a grid over ``x_range``."""
    on_grid = tasks_on_grid(batch, true_function, x_range)
    predictions = learner.predict_per_step(on_grid)  # (steps+1, tasks, 200, 1)
    shown = [s for s in steps_to_show if s < predictions.shape[0]] or [predictions.shape[0] - 1]
    x = on_grid.query_x[0, :, 0]

    def draw(ax, t):
        for s in shown:
            ax.plot(x, predictions[s, t, :, 0], linestyle="--" if s == 0 else "-",
                    label=f"after {s} step{'s' if s != 1 else ''}")

    return draw_task_panels(on_grid, draw, path, title)
