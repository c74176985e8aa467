"""Figures: what a figure says fits in it."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("panels", [1, 3])
def test_a_title_wider_than_its_figure_or_panel_is_wrapped_inside_it(tmp_path, panels):
    from metalearn.plotting import _figures, fit_titles, save_figure

    plt = _figures()
    long = "maml on omniglot, run folder maml-omniglot-20w1s-2026-12-06-174512-with-a-long-name, step 26500, " * 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5), squeeze=False)
    for ax in axes[0]:
        ax.set_title(f"validation accuracy, {panels} panels ({long[:90]})")
    fig.suptitle(long.strip())
    fit_titles(fig)
    renderer = fig.canvas.get_renderer()
    for text, room in [(fig._suptitle, fig.bbox)] + [(ax.title, ax.bbox) for ax in axes[0]]:
        assert "\n" in text.get_text()
        assert text.get_window_extent(renderer).width <= room.width
    assert "".join(fig._suptitle.get_text().split()) == "".join(long.split())  # every character kept
    # a short title is left as it is; the figure is written
    fig, ax = plt.subplots()
    fig.suptitle("short")
    ax.set_title("also short")
    assert save_figure(fig, tmp_path / "short.png").stat().st_size > 0
    assert (fig._suptitle.get_text(), ax.get_title()) == ("short", "also short")


def test_drawing_leaves_the_process_s_matplotlib_backend_alone(tmp_path):
    """A notebook's inline backend stays: metalearn's figures never go through pyplot."""
    import matplotlib

    from metalearn.plotting import _figures, save_figure

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        fig, ax = _figures().subplots(figsize=(3, 2))
        ax.plot([0, 1], [1, 0])
        fig.suptitle("a title")
        assert save_figure(fig, tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_records_with_nothing_to_draw_are_one_line(tmp_path):
    """A foreign or hand-edited metrics.jsonl whose records hold no drawable series: a
    MetalearnError, not matplotlib's ValueError for a figure of no panels."""
    from metalearn.errors import MetalearnError
    from metalearn.plotting import plot_learning_curves

    with pytest.raises(MetalearnError, match="^the metrics hold no series to draw"):
        plot_learning_curves([{"step": 1, "tasks_per_s": 3.0}], tmp_path / "curves.png", "nothing")
    assert not (tmp_path / "curves.png").exists()
