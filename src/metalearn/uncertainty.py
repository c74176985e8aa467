"""How good a method's uncertainty is: measures on sampled models, for PLATIPUS (Finn, Xu &
Levine 2018) and, through ``predict``, for any method (MAML counts as one sample).

Regression (ambiguous tasks such as sine-or-line, PLATIPUS section 6):

* :func:`predictive_log_likelihood`: the mean log density of held-out noisy targets under the
  predictive distribution. ``kind="mixture"``: an equal-weight mixture of Gaussians, one per
  sampled function, each with the task's known noise std, ``log (1/S) sum_s N(y; f_s(x),
  noise^2)``; ``kind="gaussian"``: one Gaussian fitted to the samples at each x,
  ``N(y; mean_s f_s(x), var_s f_s(x) + noise^2)``. With one sample (MAML) both are
  ``log N(y; f(x), noise^2)``.
* :func:`coverage`: the fraction of input points at which the true (noiseless) function lies
  between the samples' minimum and maximum (``kind="minmax"``), or inside their central
  ``level`` interval (``kind="interval"``, empirical quantiles).

Classification: :func:`expected_calibration_error` (Guo et al. 2017, 15 equal-width confidence
bins) and :func:`negative_log_likelihood` of the predicted class probabilities.

:func:`compare_learners` evaluates trained run directories (e.g. a PLATIPUS and a MAML run) on
the same test episodes and returns all of it as a dict.

Example::

    >>> samples = platipus.sample_predictions(batch, 20)            # (20, tasks, n, 1)
    >>> predictive_log_likelihood(samples, batch.query_y, noise_std=0.3).mean()
    >>> runs = {"platipus": "runs/platipus-sol", "maml": "runs/maml-sol"}
    >>> compare_learners(runs, episodes=600)["platipus"]["coverage_minmax"]
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalearn.algorithms import can, methods_that
from metalearn.algorithms.base import average_prediction, device_of, evaluating
from metalearn.checkpoints import load_trained_state, recorded_images, run_images
from metalearn.config import MAX_SEED, task_differences
from metalearn.datasets import get_dataset, reads_image_folder
from metalearn.distributed import init_world
from metalearn.errors import (MetalearnError, OptionError, OptionWarning, caller_level, check_count,
                              keyword_only_after, spellings)
from metalearn.evaluation import check_seed, fewer_steps_advice, scored_in_calls, tasks_per_call
from metalearn.evaluation_setup import (plain_shape, plain_values, warn_of_other_images, warn_of_validation_episodes,
                                        with_test_shape)
from metalearn.files import FOLDER, RUN, check_paths, same_path, user_path
from metalearn.runs import RunDir
from metalearn.runtime import DroppingStream, cuda_devices, float32_default, own_random_state, show_progress
from metalearn.tasks import build_task_source, true_function as tasks_true_function
from metalearn.tasks.batch import TaskBatch
from metalearn.training import part_seed_offset

# -- regression ------------------------------------------------------------------------------


def predictive_log_likelihood(samples: Tensor, targets: Tensor, noise_std: float, kind: str = "mixture") -> Tensor:
    """Mean log predictive density per point and output, one value per task.

    samples: (S, tasks, n, out) sampled functions at the query inputs; targets: (tasks, n, out)
    noisy observations; noise_std: the tasks' observation noise (> 0). Returns (tasks,).
    """
    if not noise_std > 0:
        raise MetalearnError(f"the predictive log-likelihood needs a positive noise std, got {noise_std}")
    if kind == "mixture":
        log_normal = torch.distributions.Normal(samples, noise_std, validate_args=False).log_prob(targets.unsqueeze(0))
        log_density = torch.logsumexp(log_normal, 0) - math.log(samples.shape[0])
    elif kind == "gaussian":
        variance = samples.var(0, correction=0) + noise_std**2
        log_density = torch.distributions.Normal(samples.mean(0), variance.sqrt(), validate_args=False).log_prob(targets)
    else:
        raise MetalearnError(f"kind must be 'mixture' or 'gaussian', got {kind!r}")
    return log_density.flatten(1).mean(1)


def coverage(samples: Tensor, truth: Tensor, kind: str = "minmax", level: float = 0.95) -> Tensor:
    """Fraction of points where ``truth`` lies within the sampled functions' band, per task.

    samples: (S, tasks, n, out); truth: (tasks, n, out). ``kind="minmax"``: between the samples'
    minimum and maximum; ``kind="interval"``: between their (1-level)/2 and (1+level)/2
    empirical quantiles. Returns (tasks,) in [0, 1].
    """
    if kind == "minmax":
        low, high = samples.min(0).values, samples.max(0).values
    elif kind == "interval":
        if not 0 < level < 1:
            raise MetalearnError(f"level must be in (0, 1), got {level}")
        bounds = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype, device=samples.device)
        low, high = torch.quantile(samples, bounds, dim=0)
    else:
        raise MetalearnError(f"kind must be 'minmax' or 'interval', got {kind!r}")
    inside = (truth >= low) & (truth <= high)
    return inside.flatten(1).float().mean(1)


# -- classification --------------------------------------------------------------------------


def expected_calibration_error(log_probs: Tensor, labels: Tensor, bins: int = 15) -> Tensor:
    """ECE (Naeini et al. 2015; Guo et al. 2017): sum over equal-width confidence bins of
    ``|bin| / N * |accuracy(bin) - mean confidence(bin)|``, confidence = max class probability.

    log_probs: (..., classes) log-probabilities or logits (normalised here with log_softmax);
    labels: (...) class ids. Bins are (k/bins, (k+1)/bins]. Returns a scalar in [0, 1].
    """
    probs = log_probs.log_softmax(-1).exp().reshape(-1, log_probs.shape[-1])
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels.reshape(-1)).to(probs.dtype)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype, device=probs.device)
    index = torch.bucketize(confidence, edges[1:-1], right=False)  # bin k holds (edges[k], edges[k+1]]
    # sum_b |bin b| / N * |acc_b - conf_b| = sum_b |hits_b - total confidence_b| / N
    confidence_sum = torch.zeros(bins, dtype=probs.dtype, device=probs.device).index_add_(0, index, confidence)
    correct_sum = torch.zeros_like(confidence_sum).index_add_(0, index, correct)
    return (correct_sum - confidence_sum).abs().sum() / confidence.numel()


def negative_log_likelihood(log_probs: Tensor, labels: Tensor) -> Tensor:
    """Mean -log p(label) over all examples. log_probs: (..., classes) (normalised here)."""
    flat = log_probs.log_softmax(-1).reshape(-1, log_probs.shape[-1])
    return -flat.gather(1, labels.reshape(-1, 1)).mean()


# -- any learner -----------------------------------------------------------------------------


def predictive_samples(learner, batch: TaskBatch, num_samples: int | None = None) -> Tensor:
    """Query outputs of sampled models, ``(S, tasks, n_query, out)``: the learner's
    ``sample_predictions`` when it has one (PLATIPUS), else its single ``predict`` (S = 1)."""
    if can(learner, "samples models"):
        return learner.sample_predictions(batch, num_samples)
    return learner.predict(batch).unsqueeze(0)


def _mean_ci(values: Tensor) -> tuple[float, float]:
    n = values.numel()
    std = float(values.std()) if n > 1 else 0.0
    return float(values.mean()), 1.96 * std / math.sqrt(n)


def uncertainty_scores(learner, batch: TaskBatch, true_function=None, noise_std: float | None = None,
                       num_samples: int | None = None, grid: Tensor | None = None,
                       level: float = 0.95) -> dict[str, Tensor]:
    """Per-task measures of one learner on one batch (each value ``(tasks,)``).

    Classification: ``accuracy``, ``nll``, and per-example (not per-task) ``ece`` inputs are
    returned as ``log_probs`` / ``labels`` for pooling. Regression: ``mse`` of the mean
    prediction, ``log_likelihood`` (mixture) and ``log_likelihood_gaussian`` on the query points
    (needs ``noise_std``), and ``coverage_minmax`` / ``coverage_interval`` of
    ``true_function(batch.task_params, grid)`` on ``grid`` (1, n, 1) inputs (needs both).
    """
    with evaluating(learner):
        with torch.no_grad():
            samples = predictive_samples(learner, batch, num_samples)
            if batch.is_classification:
                log_probs = average_prediction(samples, True)
                nll = -log_probs.log_softmax(-1).gather(-1, batch.query_y.unsqueeze(-1)).squeeze(-1).mean(-1)
                accuracy = (log_probs.argmax(-1) == batch.query_y).float().mean(-1)
                # a task with a non-finite prediction (a diverged adaptation) scores NaN, as in
                # evaluate (prediction_scores): argmax would turn NaN logits into class 0
                finite = torch.isfinite(log_probs).flatten(1).all(-1)
                accuracy = torch.where(finite, accuracy, torch.full_like(accuracy, math.nan))
                return {"accuracy": accuracy, "nll": nll, "log_probs": log_probs, "labels": batch.query_y}
            scores = {"mse": (samples.mean(0) - batch.query_y).square().flatten(1).mean(1)}
            if noise_std:
                scores["log_likelihood"] = predictive_log_likelihood(samples, batch.query_y, noise_std, "mixture")
                scores["log_likelihood_gaussian"] = predictive_log_likelihood(samples, batch.query_y, noise_std,
                                                                              "gaussian")
            if true_function is not None and grid is not None:
                x = grid.expand(batch.num_tasks, -1, -1).contiguous()
                truth = true_function(batch.task_params, x)
                on_grid = TaskBatch(batch.support_x, batch.support_y, x, truth, 0, batch.task_params)
                grid_samples = predictive_samples(learner, on_grid, num_samples)
                scores["coverage_minmax"] = coverage(grid_samples, truth, "minmax")
                scores["coverage_interval"] = coverage(grid_samples, truth, "interval", level)
            return scores


RESULT_KEYS = ("episodes", "seed", "part", "dataset", "num_samples", "overrides", "ways", "shots", "query")  # compare_learners' own fields


def models_drawn(learner, num_samples: int | None) -> int:
    """How many models per task ``learner`` scores with: ``num_samples``, or its own
    ``config.num_samples`` where None, for a method that samples models (PLATIPUS); 1 for any
    other (its single prediction)."""
    if not can(learner, "samples models"):
        return 1
    return num_samples if num_samples is not None else int(learner.config.num_samples)


# the options that score runs on one episode shape, as Python and the command line give them
SHAPE_OPTIONS = ("episode_shape=...", "metalearn compare --ways, --shots, --query; in Python, "
                 "compare_learners(episode_shape=...)")


def check_samples_apply(methods: list[str], num_samples: int | None) -> None:
    """Refuse ``num_samples`` (``--samples``) where none of ``methods`` samples models: it would be
    silently unused, each of them giving one prediction per query (``predict`` and ``compare``)."""
    if num_samples is None or any(can(method, "samples models") for method in methods):
        return
    named = sorted(set(methods))
    raise OptionError(f"{{num_samples}} is for methods that sample models ({methods_that('samples models')}); "
                      f"{' and '.join(named)} give{'s' if len(named) == 1 else ''} one prediction per query: leave "
                      "{num_samples} out", num_samples=("num_samples", "--samples"))


def run_labels(run_dirs: list[Path | str] | tuple[Path | str, ...]) -> dict[str, Path | str]:
    """``{label: run directory}`` for :func:`compare_learners`, as ``metalearn compare`` labels
    its runs: by the folder's name (``.`` too), or by the path as given where that name is one of
    the result's own fields (``RESULT_KEYS``) or another run's. A run given twice is refused."""
    if isinstance(run_dirs, (str, os.PathLike)):  # one path: read a character at a time otherwise
        raise MetalearnError(f"run_labels takes a list of run folders, got one path {str(run_dirs)!r}: give "
                             f"[{str(run_dirs)!r}, ...]")
    twice = next((d for i, d in enumerate(run_dirs) if any(same_path(d, e) for e in run_dirs[:i])), None)
    if twice is not None:
        raise MetalearnError(f"the run {twice} is given twice; give each run once")
    names = [Path(d).resolve().name for d in run_dirs]
    labels = {name if name not in RESULT_KEYS and names.count(name) == 1 else str(d): d
              for name, d in zip(names, run_dirs)}
    if len(labels) != len(run_dirs) or set(labels) & set(RESULT_KEYS):
        raise MetalearnError("compare labels runs by their folder names or paths; give each run once, "
                             f"under a path other than {', '.join(RESULT_KEYS)}")
    return labels


@keyword_only_after(1)
def compare_learners(runs: dict[str, Path | str], *, episodes: int = 600, seed: int = 0, part: str = "test",
                     num_samples: int | None = None, chunk: int = 50, grid_points: int = 100,
                     level: float = 0.95, data_dir: Path | str | None = None,
                     overrides: dict[str, Any] | None = None,
                     episode_shape: dict[str, int] | None = None, device: str = "cpu",
                     progress: bool | None = None) -> dict[str, Any]:
    """Evaluate trained runs ``runs``, ``{label: run_dir}`` (:func:`run_labels` labels a list of
    folders as ``metalearn compare`` does), on the same ``episodes`` episodes of split part
    ``part`` ("test", the default; "val", or "train": the test episodes' shape on the training
    classes), the ones ``metalearn eval`` uses for ``seed``, with the model noise of sampling
    methods seeded by ``seed`` too, so the comparison is reproducible. ``chunk``: the episodes
    drawn at a time, which every run scores before the next are drawn; the episodes depend on it,
    and the default, 50, draws those of ``metalearn eval``. ``data_dir``: the folder the
    episodes' images are drawn from; None (the default): the one the runs record (runs that
    record different folders are refused), else the dataset's default (Omniglot's
    ``$METALEARN_DATA``).

    Returns ``{"episodes", "seed", "part", "dataset", "num_samples", "overrides", "ways", "shots",
    "query", label: {measure: {"mean", "ci95"}, ..., "run_dir", "method", "step", "num_samples"}}``.
    For every run after the first, each per-episode measure also holds ``difference``: the mean
    and 95% interval of its per-episode differences from the first run's on the same episodes
    (paired, so far narrower than the two intervals side by side). Each run's
    ``num_samples`` is the number of models it drew per task (``num_samples``, or where None its
    own ``num_samples`` option; 1 for a method without samples, MAML); the top-level
    ``num_samples`` is the number the sampling runs drew, None where there are none or they drew
    different numbers (their own, with ``num_samples`` None). ``overrides`` records the method
    options changed for this comparison (``{}`` for none), so that the file says what was
    compared. Measures: for classification ``accuracy`` (%),
    ``nll``, ``ece`` (15 bins, pooled over all query examples, no CI); for regression ``mse``,
    ``log_likelihood`` (mixture), ``log_likelihood_gaussian``, ``coverage_minmax`` and
    ``coverage_interval`` (central ``level`` interval) of the true function on ``grid_points``
    inputs spread over the task's input range. All runs must share the task configuration of
    their test episodes.
    ``overrides`` changes method options of every run for this comparison (e.g.
    ``{"test_inner_steps": 1}``). ``episode_shape`` (keys ``ways``, ``shots``, ``query``) scores
    every run on episodes of that shape instead of its test shape, as ``metalearn eval --ways``
    does (runs trained with different shots compared on one shape); ``ways``, ``shots`` and
    ``query`` in the result are those of the episodes scored, as in an evaluation's file.
    A run some of whose episodes diverged (a non-finite accuracy or MSE) holds their count in
    ``diverged``, its measures are NaN, and a :class:`~metalearn.errors.MetalearnWarning` says so
    (``metalearn compare`` prints it as a ``warning:`` line).
    ``device`` (cpu, cuda, cuda:N or auto, as for :func:`~metalearn.api.evaluate_run`, and refused
    as it refuses one, before any run is read): where the runs are scored; the episodes are drawn
    on the CPU whatever the device, as ``evaluate_run`` draws them, so a seed gives the same
    episodes on any device. ``progress``: a progress bar while the episodes are scored; None (the
    default) draws it only when the error output is a terminal or a notebook
    (:func:`~metalearn.runtime.show_progress`), as ``evaluate_run`` does.
    """
    progress = show_progress(progress, "compare_learners")
    episodes, chunk, grid_points, seed, overrides = _checked_arguments(runs, episodes, chunk, grid_points, seed, part,
                                                                       overrides)
    check_paths(("data_dir", data_dir, FOLDER))
    # refused as evaluate_run refuses it (a name that is none, a GPU this machine lacks), before any run is read
    where = init_world(device).device
    loaded, states = _loaded_runs(runs, overrides, episode_shape)
    check_samples_apply([config.method for config, _, _ in loaded.values()], num_samples)
    _check_one_supervised_dataset(runs, loaded)
    splits = _recorded_splits(runs)
    _check_one_test_task(loaded, splits)
    first_label = next(iter(loaded))
    first_task = loaded[first_label][0].task
    data_given = data_dir is not None
    if not data_given:
        data_dir = _shared_images(runs, states, first_label)
    if splits:  # the episodes are drawn from the test classes of the recorded split
        recorded = next(iter(splits))
        first_task = RunDir(runs[recorded]).with_own_split(loaded[recorded][0], data_dir).task
    # the episodes eval --part draws
    source = build_task_source(first_task, part, data_dir=data_dir, progress=progress, evaluation=True)
    for label, (config, _, _) in loaded.items():  # a folder that is not the one a run trained on: as eval says
        if reads_image_folder(config.task.dataset):
            warn_of_other_images(runs[label], config, source, states[label].get("data_fingerprint"), data_dir,
                                 data_given)
    # each learner on the device, as evaluate_run moves its learner; the batches follow in the scoring
    loaded = {label: (config, learner.to(where), step) for label, (config, learner, step) in loaded.items()}
    per_task, pooled = _scores_on_shared_episodes(runs, loaded, source, first_task, part, episodes, seed, chunk,
                                                  num_samples, grid_points, level, where, progress)
    # what was drawn, not only what was asked: None asks each sampling run for its own number
    drawn = {label: models_drawn(learner, num_samples) for label, (_, learner, _) in loaded.items()}
    sampled = {drawn[label] for label, (_, learner, _) in loaded.items() if can(learner, "samples models")}
    tested = first_task.for_testing()
    result: dict[str, Any] = {"episodes": episodes, "seed": seed, "part": part, "dataset": first_task.dataset,
                              "num_samples": sampled.pop() if len(sampled) == 1 else None,
                              "overrides": dict(overrides or {}),
                              "ways": tested.ways, "shots": tested.shots, "query": tested.query}
    for label, (config, _, step) in loaded.items():
        result[label] = {"run_dir": str(runs[label]), "method": config.method, "step": step,
                         "num_samples": drawn[label],
                         **_measures(per_task[label], per_task[first_label] if label != first_label else None,
                                     pooled[label])}
        if result[label].get("diverged"):  # as evaluate_run warns of them, at the user's call
            advice, steps = fewer_steps_advice(config.method)
            warnings.warn(OptionWarning(f"{result[label]['diverged']} of {episodes} episodes of {{label}} diverged "
                                        f"(non-finite predictions), which makes its measures NaN{advice}",
                                        label=(label, label), **steps), stacklevel=caller_level())
    return result


def _checked_arguments(runs: Any, episodes: Any, chunk: Any, grid_points: Any, seed: Any, part: str,
                       overrides: Any) -> tuple[int, int, int, int, Any]:
    """:func:`compare_learners`' arguments checked before any run is loaded: ``episodes``,
    ``chunk``, ``grid_points`` and ``seed`` as Python's ints (NumPy's too), ``overrides`` with
    plain values; ``runs`` a non-empty dict whose labels are not the result's own fields and
    whose folders are each given once."""
    if not isinstance(runs, dict):
        raise MetalearnError(f"compare_learners takes {{label: run directory}}, got {type(runs).__name__}; e.g. "
                             "metalearn.uncertainty.run_labels(run_dirs), which labels them as metalearn compare does")
    if not runs:
        raise MetalearnError("compare_learners needs at least one run directory")
    for label, path in runs.items():  # before same_path reads them
        user_path(path, f"runs[{label!r}]", what=RUN)
    for value, name in ((episodes, "episodes"), (chunk, "chunk"), (grid_points, "grid_points")):
        check_count(value, name)
    episodes, chunk, grid_points = int(episodes), int(chunk), int(grid_points)  # NumPy counts as Python's
    seed, overrides = check_seed(seed, most=MAX_SEED), plain_values(overrides)
    part_seed_offset(part)  # an unknown part, before any run is loaded
    taken = [label for label in runs if label in RESULT_KEYS or not label]
    if taken:  # a run's entry would overwrite the result's own field, or have no name
        raise MetalearnError(f"compare_learners cannot label a run {taken[0]!r}: the result uses "
                             f"{', '.join(RESULT_KEYS)} for itself; give the run another label")
    given = list(runs.items())
    for i, (label, path) in enumerate(given):
        twin = next((other for other, earlier in given[:i] if same_path(earlier, path)), None)
        if twin is not None:  # scored twice, it would read as two runs that agree
            raise MetalearnError(f"runs {twin!r} and {label!r} are one run ({path}); give each run once")
    return episodes, chunk, grid_points, seed, overrides


def _loaded_runs(runs: dict[str, Path | str], overrides: dict[str, Any] | None, episode_shape: dict[str, int] | None
                 ) -> tuple[dict[str, tuple[Any, Any, int]], dict[str, dict[str, Any]]]:
    """``{label: (config, learner, step)}`` of each run's checkpoint with ``overrides``, its
    test episodes of ``episode_shape`` where given, and ``{label: state}``: each checkpoint's
    entries, read with its weights."""
    loaded, states = {}, {}
    for label, path in runs.items():
        config, learner, step, states[label] = load_trained_state(path, overrides)
        loaded[label] = (config, learner, step)
    if episode_shape:
        episode_shape = plain_shape(episode_shape)
        for label, (config, learner, step) in loaded.items():
            try:
                loaded[label] = (with_test_shape(config, episode_shape), learner, step)
            except MetalearnError as err:  # which run cannot take the shape
                raise OptionError(f"run {label!r}: {{error}}", error=spellings(err)) from None
    return loaded, states


def _check_one_supervised_dataset(runs: dict[str, Path | str], loaded: dict[str, tuple[Any, Any, int]]) -> None:
    """Refuse runs of a reinforcement-learning environment, whose predictions compare does not
    score, and runs of different datasets (before their splits, which only runs of one dataset
    can share)."""
    for label, (config, _, _) in loaded.items():
        if get_dataset(config.task.dataset).reinforcement:
            raise MetalearnError(f"{runs[label]} learned {config.task.dataset}, a reinforcement-learning environment: "
                                 "compare scores predictions of supervised tasks; draw RL runs side by side with "
                                 "metalearn plot RUN_DIR --compare OTHER_RUN")
    datasets = {label: config.task.dataset for label, (config, _, _) in loaded.items()}
    first_label = next(iter(datasets))
    other = next((label for label, name in datasets.items() if name != datasets[first_label]), None)
    if other is not None:
        raise MetalearnError(f"runs {first_label!r} and {other!r} are tested on different tasks (dataset "
                             f"{datasets[first_label]} vs {datasets[other]}); compare runs of the same task")


def _recorded_splits(runs: dict[str, Path | str]) -> dict[str, dict[str, Any]]:
    """``{label: split}`` of runs on class folders: the split each run recorded (split.json;
    none for fixed datasets). Where every run has one, the splits must be equal, and how each
    was given (fractions, a file) is moot; runs with and without one are refused."""
    splits = {label: split for label in runs if (split := RunDir(runs[label]).read_split()) is not None}
    unrecorded = [label for label in runs if label not in splits]
    if splits and unrecorded:  # a run on part folders or CSV files, or from before split.json
        raise OptionError(f"run {next(iter(splits))!r} recorded the split of its class folders (split.json) and "
                          f"{unrecorded[0]!r} none (it trained on train/ val/ test/ folders or CSV files, or before "
                          "runs recorded their split: a {resume} writes it): compare runs of one folder and split",
                          resume=("train(..., resume=True)", "--resume"))
    if splits:
        recorded, split = next(iter(splits.items()))
        for label, other in splits.items():
            if other != split:
                raise MetalearnError(f"runs {recorded!r} and {label!r} split their class folders differently (see "
                                     "split.json in each): one's test classes may be the other's training classes; "
                                     "compare runs of the same split")
    return splits


def _check_one_test_task(loaded: dict[str, tuple[Any, Any, int]], splits: dict[str, Any]) -> None:
    """Refuse runs whose test episodes differ (the split's options aside where the runs recorded
    one split), advising one episode shape given where only the shape differs."""
    moot = {"split_fractions": "", "split_file": ""} if splits else {}
    tasks = {label: dataclasses.replace(config.task.for_testing(), **moot) for label, (config, _, _) in loaded.items()}
    first_label, first_task = next(iter(tasks.items()))

    def beside_shape(task) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(task).items() if k not in ("ways", "shots", "query")}

    for label, task in tasks.items():
        if task != first_task:
            differ = task_differences(first_task, task)
            # where only the episode shape differs, one shape given scores both
            advice = ("score them on one shape ({shape})" if beside_shape(task) == beside_shape(first_task)
                      else "compare runs of the same task")
            raise OptionError(f"runs {first_label!r} and {label!r} are tested on different tasks ({{differ}}); "
                              f"{advice}", differ=(differ, differ), shape=SHAPE_OPTIONS)


def _shared_images(runs: dict[str, Path | str], states: dict[str, dict[str, Any]], first_label: str) -> Any:
    """Where no folder is given, the one the runs record (a run on an image folder does): one
    folder for all, since every run is scored on the same episodes; runs that record different
    folders are refused."""
    folders = {label: recorded_images(RunDir(runs[label]), states[label]) for label in runs}
    named = {label: folder for label, folder in folders.items() if folder is not None}
    if len({folder.resolve() for folder in named.values()}) > 1:
        one, a = next(iter(named.items()))
        other, b = next((label, folder) for label, folder in named.items() if folder.resolve() != a.resolve())
        raise OptionError(f"runs {one!r} and {other!r} trained on different image folders ({a}, {b}): compare "
                          "scores every run on the same episodes; give {data_dir}, the folder to draw them from",
                          data_dir="data_dir")
    recording = next(iter(named), first_label)  # a run that records it (a moved folder is refused)
    return run_images(RunDir(runs[recording]), None, states[recording])


def _scores_on_shared_episodes(runs: dict[str, Path | str], loaded: dict[str, tuple[Any, Any, int]], source,
                               task, part: str, episodes: int, seed: int, chunk: int, num_samples: int | None,
                               grid_points: int, level: float, device: torch.device, progress: bool
                               ) -> tuple[dict[str, dict[str, list[Tensor]]], dict[str, list[tuple[Tensor, Tensor]]]]:
    """Every run scored on the same ``episodes`` episodes of ``source`` (those ``metalearn eval``
    draws for ``seed`` and ``part``), ``chunk`` at a time: ``{label: {measure: [per-task
    values, a tensor per chunk]}}`` and ``{label: [(log_probs, labels), ...]}`` for the
    calibration error, pooled over the query examples. The episodes are drawn on the CPU and
    scored on ``device`` (where the learners are); the scores come back to the CPU chunk by chunk,
    so a GPU holds one chunk's. ``progress``: a bar over the episodes, advanced as each chunk has
    been scored by every run."""
    true_function = tasks_true_function(source, task)  # None where its inputs are not single numbers
    noise_std = getattr(source, "noise_std", None)
    x_range = getattr(source, "x_range", (-5.0, 5.0))
    grid = torch.linspace(x_range[0], x_range[1], grid_points).view(1, -1, 1).to(device)

    per_task: dict[str, dict[str, list[Tensor]]] = {label: {} for label in runs}
    pooled: dict[str, list[tuple[Tensor, Tensor]]] = {label: [] for label in runs}
    offset = part_seed_offset(part)
    for label, (config, _, _) in loaded.items():
        warn_of_validation_episodes(runs[label], config, part, seed + offset)
    generator = torch.Generator().manual_seed(seed + offset)
    remaining = episodes
    per_call: dict[str, int | None] = {}  # tasks per scoring call, where a chunk would not fit the memory at once
    bar = None
    if progress:  # as evaluate's bar, on the error output; a failed write of it stops no scoring
        from tqdm import tqdm

        bar = tqdm(total=episodes, desc="comparing", unit="episode", leave=False,
                   file=DroppingStream(drop_when_busy=True))
    # the episodes evaluate draws, whatever the default; the CUDA devices' states are kept where CUDA is in use, as
    # evaluate keeps them (torch.manual_seed below reseeds them all)
    with own_random_state(cuda_devices()), float32_default():
        chunk_index = 0
        while remaining > 0:
            batch = source.sample(min(chunk, remaining), generator)  # drawn on the CPU, as evaluate draws it
            remaining -= batch.num_tasks
            chunk_index += 1
            batch = batch.to(device)
            for label, (run_config, learner, _) in loaded.items():
                def score(tasks, learner=learner):
                    return uncertainty_scores(learner, tasks, true_function, noise_std, num_samples, grid, level)

                if label not in per_call and batch.num_tasks > 1:  # as evaluate: measured on the first chunk
                    per_call[label] = tasks_per_call(score, batch, device_of(learner), run_config.train.memory_budget)
                # every run sees the same model-noise stream, whichever runs it is compared with
                torch.manual_seed(seed + offset + 7919 * chunk_index)
                scores = {name: values.cpu() for name, values in scored_in_calls(score, batch,
                                                                                  per_call.get(label)).items()}
                if "log_probs" in scores:
                    pooled[label].append((scores.pop("log_probs"), scores.pop("labels")))
                for name, values in scores.items():
                    per_task[label].setdefault(name, []).append(values)
            if bar is not None:
                bar.update(batch.num_tasks)
    if bar is not None:
        bar.close()
    return per_task, pooled


def _measures(per_task: dict[str, list[Tensor]], first: dict[str, list[Tensor]] | None,
              pooled: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    """One run's entries of :func:`compare_learners`' result: each measure's mean and 95%
    interval over the episodes, and, for a run after the first (``first``: that run's
    ``per_task``), the paired ``difference`` from it; ``diverged`` where a run's accuracy or MSE
    is not finite; ``ece`` pooled over the query examples."""
    entry: dict[str, Any] = {}
    for name, chunks in per_task.items():
        scale = 100.0 if name == "accuracy" else 1.0
        values = torch.cat(chunks) * scale
        mean, ci95 = _mean_ci(values)
        entry[name] = {"mean": mean, "ci95": ci95}
        if first is not None and name in first:
            # the same episodes: the interval of the per-episode differences, far narrower than
            # the two runs' intervals side by side, says whether they differ
            mean, ci95 = _mean_ci(values - torch.cat(first[name]) * scale)
            entry[name]["difference"] = {"mean": mean, "ci95": ci95}
        if name in ("accuracy", "mse") and not bool(torch.isfinite(values).all()):
            entry["diverged"] = int((~torch.isfinite(values)).sum())  # its measures are NaN: said, not hidden
    if pooled:
        log_probs = torch.cat([lp.reshape(-1, lp.shape[-1]) for lp, _ in pooled])
        labels = torch.cat([lb.reshape(-1) for _, lb in pooled])
        entry["ece"] = {"mean": float(expected_calibration_error(log_probs, labels)), "ci95": None}
    return entry
