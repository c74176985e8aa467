"""Pictures of a reinforcement-learning run: the average return against the number of
policy-gradient steps (MAML's Figure 5, with the pretrained and randomly initialised policies
beside it); for nav2d the trajectories before and after one step with the goal, for the
half-cheetahs the forward velocity over an episode before and after one step with the goal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from metalearn.plotting import _figures, save_figure

# the authors' results behind the paper's Figure 5 (cbfinn/maml_rl, icml/icml_{point,cheetah,
# cheetahdirec}_results_*.pkl: mean over their 40 test tasks of the average return after 0..3
# steps). nav2d's pretrained row is the mean of icml_point_results_sens0.pkl: the repository's
# make_point_plots.py reads the pretrained curve from icml_point_results_maml0.pkl, which it does
# not hold, so that sens0 holds the pretrained policy's results is an inference. The half-cheetahs'
# MAML rows are the policies that test_maml_cheetah.py and test_maml_cheetah_direc.py load: iteration
# 475 of a run with 10 trajectories per task (cheetah-vel) and iteration 100 of one with TRPO's KL
# bound 0.02 (cheetah-dir). The half-cheetahs ran on rllab's model, not gymnasium's HalfCheetah-v5:
# the same reward, another body and simulator, so their numbers are a guide to the shape, not a target.
PAPER_RETURNS = {"nav2d": {"MAML": [-40.41, -11.68, -3.33, -3.23], "pretrained": [-40.81, -19.73, -11.72, -8.47],
                           "random": [-82.66, -57.96, -53.84, -46.81]},
                 "cheetah-vel": {"MAML": [-129.53, -78.57, -66.62, -60.78],
                                 "pretrained": [-158.0, -135.39, -128.47, -133.61],
                                 "random": [-254.83, -254.33, -246.79, -230.83]},
                 "cheetah-dir": {"MAML": [-50.69, 293.19, 313.48, 315.65], "pretrained": [-43.03, -24.75, -12.85, 19.57],
                                 "random": [-35.73, 21.83, 62.32, 86.18]}}

# the step size of the first policy-gradient step with which the authors' evaluation adapted each
# policy (later steps: half of it): test_maml_point.py's "ICML values" (nav2d; the pretrained row's
# own is not known, see above), test_maml_cheetah.py, and the values test_maml_cheetah_direc.py lists
# for maml, pretrain, random. metalearn adapts every policy at --inner-lr (0.1).
PAPER_STEP_SIZES = {"nav2d": {"MAML": 0.5, "random": 0.5},
                    "cheetah-vel": {"MAML": 0.1, "pretrained": 0.02, "random": 0.1},
                    "cheetah-dir": {"MAML": 0.1, "pretrained": 0.2, "random": 1.0}}
# trajectories per adaptation step of the authors' evaluation (4000 environment steps a step)
PAPER_TEST_TRAJECTORIES = {"nav2d": 40, "cheetah-vel": 20, "cheetah-dir": 20}
# the options (besides test_trajectories) a run's returns must be scored with, at their defaults,
# for the paper's returns to be drawn beside them: the step size and its decay, the horizon and the discount
PAPER_SCORING = ("inner_lr", "test_lr_decay", "horizon", "discount")

STYLES = {"MAML": ("tab:green", "-", "o"), "pretrained": ("tab:blue", "--", "s"), "random": ("black", ":", "^")}


def paper_references(dataset: str, names, method_config: dict[str, Any],
                     defaults: dict[str, Any]) -> dict[str, tuple[str, list[float]]]:
    """label -> (policy, the paper's returns per step (:data:`PAPER_RETURNS`)) of the policies
    ``names`` drawn on the figure, each label naming the step size the authors' evaluation adapted
    the policy with (:data:`PAPER_STEP_SIZES`), where ``method_config`` scores as the paper did: the
    :data:`PAPER_SCORING` options at their ``defaults`` and ``test_trajectories`` the default or
    the authors' own count (:data:`PAPER_TEST_TRAJECTORIES`); else none."""
    scored = (all(method_config.get(key) == defaults.get(key) for key in PAPER_SCORING)
              and method_config.get("test_trajectories") in (defaults.get("test_trajectories"),
                                                             PAPER_TEST_TRAJECTORIES.get(dataset)))
    if not scored:
        return {}
    steps = PAPER_STEP_SIZES.get(dataset, {})
    return {f"paper: {name}" + (f", step size {steps[name]:g}" if name in steps else ""): (name, values)
            for name, values in PAPER_RETURNS.get(dataset, {}).items() if name in names}


def plot_adaptation_curves(curves: dict[str, dict[str, Any]], path: Path, title: str = "",
                           reference: dict[str, tuple[str, list[float]]] | None = None) -> Path:
    """One line per entry of ``curves`` (label -> an evaluation result with ``per_step`` means and
    ``per_step_ci95``): average return after 0, 1, ... policy-gradient steps, with 95% intervals.
    ``reference``: label -> (a curve's label, per-step values), drawn thin and dash-dotted in that
    curve's colour (a paper's numbers, :func:`paper_references`)."""
    plt = _figures()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for label, result in curves.items():
        means = result["per_step"]
        errors = result.get("per_step_ci95") or [0.0] * len(means)
        color, style, marker = STYLES.get(label, (None, "-", "o"))
        ax.errorbar(range(len(means)), means, yerr=errors, color=color, linestyle=style, marker=marker,
                    capsize=3, label=label)
    for label, (policy, values) in (reference or {}).items():
        color = STYLES.get(policy, ("grey",))[0]
        ax.plot(range(len(values)), values, color=color, alpha=0.45, linewidth=1.0, linestyle="-.", label=label)
    ax.set_xlabel("number of policy-gradient steps")
    ax.set_ylabel("average return")
    ax.set_xticks(range(max(len(r["per_step"]) for r in curves.values())))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_navigation(before, after, goals: torch.Tensor, path: Path, title: str = "", shown: int = 5) -> Path:
    """One panel per task: ``shown`` trajectories of the policy before (dashed) and after one
    policy-gradient step (solid), from the origin, and the goal (a star). ``before``/``after``:
    :class:`~metalearn.envs.Trajectories` of nav2d (observations are positions); ``goals``:
    (tasks, 2)."""
    plt = _figures()
    tasks = goals.shape[0]
    fig, axes = plt.subplots(1, tasks, figsize=(3.3 * tasks, 3.4), squeeze=False)
    for t, ax in enumerate(axes[0]):
        for label, sampled, style, color in (("before the step", before, "--", "tab:blue"),
                                             ("after one step", after, "-", "tab:red")):
            for n in range(min(shown, sampled.observations.shape[1])):
                steps = int(sampled.mask[t, n].sum())
                # positions after each step: the next observation, or the last one plus its action
                path_xy = torch.cat([sampled.observations[t, n, :steps], _last_position(sampled, t, n, steps)])
                ax.plot(path_xy[:, 0], path_xy[:, 1], style, color=color, linewidth=0.9, alpha=0.8,
                        label=label if n == 0 else None)
        ax.scatter([goals[t, 0]], [goals[t, 1]], marker="*", s=160, color="gold", edgecolor="black", zorder=5,
                   label="goal")
        ax.scatter([0], [0], marker="o", s=20, color="black", zorder=5)
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _last_position(sampled, t: int, n: int, steps: int) -> torch.Tensor:
    """nav2d's position after the last unmasked step: its observation plus its clipped velocity."""
    from metalearn.envs.nav2d import Nav2D

    speed = Nav2D.max_speed
    last = sampled.observations[t, n, steps - 1] + (speed * sampled.actions[t, n, steps - 1]).clamp(-speed, speed)
    return last[None]


def plot_velocities(before, after, goals: dict[str, torch.Tensor], index: int | str, path: Path, title: str = "",
                    shown: int = 5) -> Path:
    """One panel per task: the forward velocity over an episode of the policy before (blue,
    dashed) and after one policy-gradient step (red): ``shown`` trajectories thin, the mean over
    all of them thick; the goal velocity as a gold line (``goals`` {"velocity": (tasks,)}) or the
    goal direction in the panel's title ({"direction": (tasks,)}, +1 forward, -1 backward).
    ``before``/``after``: :class:`~metalearn.envs.Trajectories`. ``index``: the observation that
    holds the velocity, or the name of the trajectories' :attr:`~metalearn.envs.Trajectories.info`
    that does (the half-cheetahs' ``"velocity"``: the velocity each step's reward saw)."""
    plt = _figures()
    name, values = next(iter(goals.items()))
    tasks = values.shape[0]
    fig, axes = plt.subplots(1, tasks, figsize=(3.4 * tasks, 3.0), squeeze=False, sharey=True)
    # (tasks, trajectories, H) before and after the step
    velocities = [sampled.info[index] if isinstance(index, str) else sampled.observations[..., index]
                  for sampled in (before, after)]
    for t, ax in enumerate(axes[0]):
        for label, series, style, color in (("before the step", velocities[0], "--", "tab:blue"),
                                            ("after one step", velocities[1], "-", "tab:red")):
            velocity = series[t]  # (trajectories, H)
            for n in range(min(shown, velocity.shape[0])):
                ax.plot(velocity[n], style, color=color, linewidth=0.6, alpha=0.35)
            ax.plot(velocity.mean(0), style, color=color, linewidth=1.8, label=f"{label} (mean)")
        if name == "velocity":
            ax.axhline(float(values[t]), color="gold", linewidth=2.0, label="goal velocity")
            ax.set_title(f"goal velocity {float(values[t]):.2f}", fontsize=8)
        else:
            ax.axhline(0.0, color="black", linewidth=0.6)
            ax.set_title("goal: run forward" if float(values[t]) > 0 else "goal: run backward", fontsize=8)
        ax.set_xlabel("time step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("forward velocity")
    axes[0][0].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
