"""What an evaluation of a trained run is set up with, for ``metalearn eval`` (:mod:`metalearn.api`)
and ``metalearn compare`` (:mod:`metalearn.uncertainty`) alike: the episode shape it scores
(:func:`with_test_shape`), method options and shapes with NumPy numbers made Python's, the class
split it draws from (:func:`with_split`), the labels that name its file, the seeds it records
and reads back (:func:`episode_seed`, which ``metalearn summarize`` compares), and the warnings
where the episodes scored are not new to the run."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

from metalearn.checkpoints import check_test_ways, recorded_images
from metalearn.config import EVALUATION_SHAPE, RunConfig
from metalearn.data.folder import SPLIT_OPTIONS, is_run_split, parse_fractions
from metalearn.datasets import get_dataset
from metalearn.errors import (MetalearnError, MetalearnWarning, OptionError, OptionWarning, check_count, kind_of,
                              valued)
from metalearn.files import same_path
from metalearn.options import plain_number
from metalearn.runs import RunDir
from metalearn.training import VALIDATION_SEED_OFFSET


def plain_shape(shape: Any) -> Any:
    """An episode shape with NumPy counts as Python's ints (they name the evaluation's file and
    go into its JSON); anything else as it is, for :func:`with_test_shape` to refuse."""
    return {key: plain_number(value, (int,)) for key, value in shape.items()} if isinstance(shape, dict) else shape


def plain_values(overrides: Any) -> Any:
    """Method options to change with NumPy numbers as Python's (as the options take them, and
    for the evaluation's file name and JSON); anything else as it is, to be refused where checked."""
    return ({key: plain_number(value, (int, float)) for key, value in overrides.items()}
            if isinstance(overrides, dict) else overrides)


def with_test_shape(config: RunConfig, shape: dict[str, int]) -> RunConfig:
    """``config`` whose test episodes have ``shape``'s ways / shots / query per class."""
    if not isinstance(shape, dict):
        raise MetalearnError(f"an episode shape is a dict such as {{'ways': 20, 'shots': 1}}, got a {kind_of(shape)}")
    unknown = set(shape) - {"ways", "shots", "query"}
    if unknown:
        raise MetalearnError(f"an episode shape has ways, shots and query, not {', '.join(sorted(map(str, unknown)))}")
    for key, value in shape.items():
        least = 2 if key == "ways" else 1
        check_count(value, key, least, message="{{option}} must be a whole number of at least {least}, got {value!r}",
                    error=lambda text, key=key: OptionError(text, option=EVALUATION_SHAPE[key]))
    dataset = get_dataset(config.task.dataset)
    if dataset.reinforcement and shape:
        raise OptionError(f"{config.task.dataset} is a reinforcement-learning environment: its tasks have no "
                          f"{', '.join(sorted(shape))} (the trajectories per step: {{trajectories}})",
                          trajectories=("overrides={'test_trajectories': N}", "--set test_trajectories=N"))
    if not config.task.classification and "ways" in shape:
        raise OptionError(f"{config.task.dataset} is regression: its tasks have no ways (leave out {{ways}})",
                          ways=EVALUATION_SHAPE["ways"])
    task = dataclasses.replace(config.task, **{f"test_{key}": int(value) for key, value in shape.items()})
    config = dataclasses.replace(config, task=task)
    check_test_ways(config)
    return config


def evaluation_labels(config: RunConfig, overrides: dict[str, Any] | None = None,
                      episode_shape: dict[str, int] | None = None, episodes: int | None = None,
                      seed: int = 0) -> dict[str, Any]:
    """What sets an evaluation's score apart from the run's own (its method options and episode
    shape, ``--eval-episodes`` episodes of seed 0): these name the file it is written to, so
    that a quick check with fewer episodes never replaces ``eval.json``."""
    labels = {**(overrides or {}), **(episode_shape or {})}
    if episodes is not None and episodes != config.train.eval_episodes:
        labels["episodes"] = episodes
    if seed:
        labels["seed"] = seed
    return labels


def other_images_label(run: RunDir, data_dir: Path | str | None, state: dict[str, Any] | None = None
                       ) -> dict[str, str]:
    """``{"data": NAME-HASH}`` for an evaluation of the image folder ``data_dir`` where the run
    trained on another that is still there (its checkpoint records which,
    :func:`~metalearn.checkpoints.recorded_images`): its score goes to a file of its own
    (``eval-data=photos-1a2b3c.json``: the folder's name and a hash of its absolute path, so that
    two folders of one name do not replace each other's), never to the run's ``eval.json``.
    Nothing for the run's own folder, for
    a folder given where the recorded one is gone (the run's images, moved: the data fingerprint
    warns where they changed), without ``data_dir``, or for a run that records no folder."""
    recorded = recorded_images(run, state) if data_dir is not None else None
    if recorded is None or not recorded.is_dir():
        return {}
    if same_path(data_dir, recorded):
        return {}
    given = Path(data_dir).expanduser().resolve()
    return {"data": f"{given.name}-{hashlib.sha256(os.fsencode(given)).hexdigest()[:6]}"}  # bytes, UTF-8 or not


def given_split(fractions: str | None, split_file: Path | str | None) -> dict[str, str]:
    """The split an evaluation was given, for its result file (the run's own: nothing)."""
    if fractions is not None:
        return {"split_fractions": fractions}
    return {"split_file": str(Path(split_file).expanduser().absolute())} if split_file is not None else {}


def with_split(config: RunConfig, fractions: str | None = None, split_file: Path | str | None = None,
               run_dir: Path | str | None = None, data_dir: Path | str | None = None,
               ) -> tuple[RunConfig, dict[str, str]]:
    """``config`` with its class-folder split replaced by ``fractions`` or ``split_file`` (see
    :func:`~metalearn.api.evaluate_run`), and the labels that name the evaluation's file. Without
    either: the split that ``run_dir`` recorded when it trained (its ``split.json``, where it has one), so
    that a folder changed since (classes added, removed or renamed, which reshuffles a split by
    fractions) never puts a class the run trained on into its test, and no labels (a
    ``data_dir`` of train/ val/ test/ folders or CSV files keeps its own split). Refused for
    a dataset whose split is not the user's to set. ``split_file`` naming ``run_dir``'s own
    split.json is the run's own split (no labels); another run's split.json is labelled by that
    run's folder name, other files by their stem."""
    if fractions is None and split_file is None:
        return (RunDir(run_dir).with_own_split(config, data_dir) if run_dir is not None else config), {}
    given = "split_fractions" if fractions is not None else "split_file"
    if fractions is not None and split_file is not None:
        raise OptionError("give {split_fractions} or {split_file}, not both", **SPLIT_OPTIONS)
    if "split_fractions" in get_dataset(config.task.dataset).inapplicable:
        raise OptionError(f"{{given}} applies to runs on class folders ({{dataset}}); this run's dataset is "
                          f"{config.task.dataset}, whose split is fixed", given=given,
                          dataset=("dataset='folder'", "--dataset folder"))
    if fractions is not None:
        if not isinstance(fractions, str):
            raise OptionError(f"{{split_fractions}} are given as text, train,val,test (e.g. \"0,0,1\"), got "
                              f"{fractions!r}", split_fractions="split_fractions")
        parse_fractions(fractions)  # a clear error before the folder is read
        task = dataclasses.replace(config.task, split_fractions=fractions, split_file="")
        return dataclasses.replace(config, task=task), {"split_fractions": fractions}
    path = Path(split_file)
    if run_dir is not None and same_path(path, RunDir(run_dir).split_path):
        return with_split(config, run_dir=run_dir, data_dir=data_dir)  # the run's own split.json: its own evaluation
    task = dataclasses.replace(config.task, split_fractions="", split_file=str(split_file))
    # another run's split.json: named by that run's folder (every run's file is split.json)
    return dataclasses.replace(config, task=task), {"split_file": path.parent.name if is_run_split(path) else path.stem}


def recorded_seeds(seed: int, offset: int) -> dict[str, int]:
    """What an evaluation file records of its episodes' seed: ``seed``, the one given (``metalearn
    eval --seed``, which repeats them), and ``episode_seed``, the generator's (``seed`` plus the
    part's offset: what :func:`metalearn.evaluate` takes to draw the same episodes)."""
    return {"seed": seed, "episode_seed": seed + offset}


def episode_seed(saved: dict[str, Any]) -> Any:
    """The generator seed of a stored evaluation's episodes (files written before
    ``episode_seed`` existed record it as ``seed``)."""
    return saved.get("episode_seed", saved.get("seed"))


def warn_of_other_images(run_dir, config: RunConfig, source, trained_on: str | None, data_dir,
                         given: bool = True) -> None:
    """An image folder that is not the one the run trained on (its data fingerprint, over the
    images, class names and parts, differs from the checkpoint's) is scored all the same: a
    folder that gained classes or images is scored on the run's own test classes. But the
    classes are found by name (its split.json, or the folder's own parts), so a class renamed or
    replaced since may be one the run trained on: said once, beside the result, with the counts
    then and now as a refused resume gives them. ``given``: ``data_dir`` is the user's
    --data-dir, not the folder the checkpoint records (which then holds other images now)."""
    now = getattr(source, "data_fingerprint", None)
    if trained_on is None or now is None or now == trained_on:
        return
    run = RunDir(run_dir)
    then_counts, now_counts = (fingerprint.split(":", 1)[-1] for fingerprint in (trained_on, now))
    differ = (f"{then_counts}, now {now_counts}" if then_counts != now_counts
              else f"{now_counts} either way, other images, class names or parts")
    own_split = bool(config.task.split_file) and same_path(config.task.split_file, run.split_path)
    named = ("taken by name from its split.json" if own_split else "the folder's own parts, found by name")
    folder = "{data_dir}" if given else f"its folder, {data_dir}, now"  # given, or the one recorded
    warnings.warn(OptionWarning(
        f"{folder} holds other images than the run in {run.path} trained on ({differ}): the classes "
        f"scored are {named}, so a class renamed or replaced since may be one it trained on",
        data_dir=valued("data_dir", data_dir)))


def warn_of_validation_episodes(run_dir, config: RunConfig, part: str, episode_seed: int) -> None:
    """Scoring the run's validation episodes as another part: each part draws from the seed
    plus its own offset (:func:`~metalearn.training.part_seed_offset`), so a seed a million
    apart can make an evaluation's episode seed the run's validation one (a run trained with
    ``--seed 1000000`` scored with ``eval --seed 0``). Where every part draws from one task
    family (regression, reinforcement learning; classes keep them apart otherwise) those are
    the very episodes the run was validated on (and, with ``keep_best``, that chose its best
    checkpoints): said once, beside the result. A run that never validated is not warned of."""
    if part == "val" or config.task.classification or config.train.val_every <= 0 \
            or episode_seed != config.train.seed + VALIDATION_SEED_OFFSET:
        return
    run = RunDir(run_dir)
    chose = "which chose its best checkpoints" if config.train.keep_best else "on which it was validated"
    warnings.warn(MetalearnWarning(
        f"these {part} episodes are the validation episodes of the run in {run.path} (trained with seed "
        f"{config.train.seed}; its task family is one for every part), {chose}: the score "
        f"is not one on unseen tasks: score with another seed"))


def warn_of_training_classes(run_dir, config: RunConfig, source, part: str) -> None:
    """A split given at evaluation (``--split-fractions``, ``--split-file``) that scores classes
    named as the run's training classes: on the folder it trained on, the score is not one of
    new classes. Said once, beside the result (another folder may share class names)."""
    run = RunDir(run_dir)
    scored = (getattr(source, "class_split", None) or {}).get(part)
    own = run.read_split() if run.split_path.is_file() else None
    split_file = config.task.split_file
    if not scored or not own or (split_file and same_path(split_file, run.split_path)):
        return
    trained = sorted(set(scored) & set(own.get("train", [])))
    validated = sorted(set(scored) & set(own.get("val", []))) if part != "val" else []
    if trained:
        warnings.warn(OptionWarning(
            f"{len(trained)} of the {len(scored)} classes scored have the names of classes that the run in "
            f"{run.path} trained on (e.g. {trained[0]!r}; its split.json lists them): on the folder it trained "
            "on, this is not a score on new classes (there, lower {ways}, or score its own test part)",
            ways=EVALUATION_SHAPE["ways"]))
    elif validated:  # they chose its best checkpoints and training length: scoring them again reuses that choice
        warnings.warn(MetalearnWarning(
            f"{len(validated)} of the {len(scored)} classes scored have the names of the validation classes of the "
            f"run in {run.path} (e.g. {validated[0]!r}; its split.json lists them), which chose its checkpoints: on "
            "the folder it trained on, this is not a score on unseen classes (score its own test part)"))
