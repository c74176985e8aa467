"""Few-shot prediction on new classes: a support folder of class folders, query images, and a
trained run's method (``metalearn predict``; :func:`metalearn.api.predict_run`)."""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metalearn.algorithms import MetaLearner, can
from metalearn.algorithms.base import evaluating, prediction_generator
from metalearn.data.folder import image_files, no_images_note, warn_of_skipped_files
from metalearn.data.images import is_image_file
from metalearn.errors import MetalearnError, MetalearnWarning, OptionError, caller_level, spelled, valued
from metalearn.files import IMAGES, WriteError, atomic_write_files, check_writable_file, same_path, user_path
from metalearn.locking import make_folders
from metalearn.models.norm import BatchStatNorm
from metalearn.run_files import EVAL_PATTERN, RUN_OWN_FILES

# the most query images classified per pass (with the whole support set), by metalearn predict and
# fit_predict alike (query_chunks): a pass's memory grows with its queries, so a call's is bounded by this
QUERY_CHUNK = 256
# support sets larger than this are first measured: a pass's memory grows with the support set,
# which every pass holds whole (see check_pass_fits); smaller ones take well under a gigabyte
MEASURE_SUPPORT_ABOVE = 512
# the support images of the measured pass, read PROBE_READINGS times (the largest reading counts:
# a pass that reuses pages the heap already holds reads lower)
PROBE_SUPPORT = 256
PROBE_READINGS = 2
# the estimate is refused only beyond this many times the memory available: the peak RSS of a
# pass varies between runs (where the heap places its blocks, pages the kernel reclaims) and
# the proportion counts a pass's fixed part (the model, its workspace) once per probe-sized share,
# so the estimate is coarse (test_a_pass_memory_estimate_is_near_the_pass_measured holds
# protonet's within a factor of 3): only a support set that clearly cannot fit is refused
REFUSE_ABOVE = 2.0


def read_support(folder: Path | str) -> tuple[list[str], list[list[Path]]]:
    """(class names, image files of each class) of a folder with one sub-folder per class;
    hidden entries (a name starting with ".", at any depth) are skipped."""
    folder = user_path(folder, "support", what=IMAGES)
    given = valued("support", folder)
    if not folder.is_dir():
        raise OptionError(f"{{support}} {_what_it_is(folder)}; give a folder with one sub-folder per class",
                          support=given)
    names, files, skipped = [], [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            before = len(skipped)
            images = image_files(entry, skipped=skipped)
            if not images:
                note = no_images_note(entry, skipped[before:])
                raise MetalearnError(f"support class folder {entry} has no images (PNG or JPEG)"
                                     + (f"; {note}" if note else ""))
            names.append(entry.name)
            files.append(images)
        elif is_image_file(entry):
            raise OptionError(f"{{entry}}: support images go in one sub-folder per class ({folder}/<class>/"
                              f"{entry.name})", entry=(f"{entry} in support {folder}", f"--support {entry}"))
    if not names:
        raise OptionError("{support} has no class folders: give one sub-folder per new class, holding 1 or more "
                          "example images", support=given)
    if len(names) < 2:
        raise OptionError(f"{{support}} has one class ({names[0]}): a task tells at least 2 classes apart",
                          support=given)
    warn_of_skipped_files(skipped, given)
    return names, files


def _what_it_is(path: Path) -> str:
    """What ``path`` is, for a message saying it is not what an option takes (one wording for
    --support and --query)."""
    if path.is_symlink() and not path.exists():
        return f"is a link to {os.readlink(path)}, which does not exist"
    if not path.exists():
        return "does not exist"
    return "is a file, not a folder" if path.is_file() else "is neither a file nor a folder"


def read_query(paths: list[Path | str]) -> list[Path]:
    """Query image files: the images under each folder given (sorted by path, hidden files and
    folders skipped as in :func:`metalearn.data.folder.image_files`), and each file given.

    A file reached twice (a folder and a file in it, a path given twice, a link to a file
    given too) is classified once, at its first place, with one warning naming how many were
    dropped: counted twice it would weigh twice in the accuracy. An empty path is refused (it
    would mean the working directory)."""
    files: list[Path] = []
    for given in paths:
        path = user_path(given, "query", what=IMAGES)
        if path.is_dir():
            skipped: list[Path] = []
            found = image_files(path, skipped=skipped)
            if not found:
                note = no_images_note(path, skipped)
                raise OptionError("{query} holds no images (PNG or JPEG)" + (f"; {note}" if note else ""),
                                  query=valued("query", path))
            warn_of_skipped_files(skipped, valued("query", path))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise OptionError(f"{{query}} {_what_it_is(path)}; give image files or folders of them",
                              query=valued("query", path))
    if not files:
        raise MetalearnError("no query images given")
    first: dict[str, Path] = {}
    for path in files:
        first.setdefault(os.path.realpath(path), path)
    if len(first) < len(files):
        repeated = len(files) - len(first)
        example = next(path for path in files if first[os.path.realpath(path)] is not path)
        kept = first[os.path.realpath(example)]
        same = "" if str(kept) == str(example) else f", the same file as {kept}"
        warnings.warn(MetalearnWarning(
            f"{repeated} query image{' was' if repeated == 1 else 's were'} given twice (e.g. {example}{same}): each "
            "is classified and counted once"), stacklevel=caller_level())
    return list(first.values())


def warn_of_query_in_support(support: list[list[Path]], query: list[Path]) -> None:
    """A warning when query images are support images too (the same file, also through a link):
    the learner was given them with their labels, so their predictions (and an accuracy that
    counts them) do not show how it classifies new images. It does not say they get their
    support label: a prototype of several shots, or an adapted network, may give another."""
    given = {os.path.realpath(path) for group in support for path in group}
    repeated = [path for path in query if os.path.realpath(path) in given]
    if repeated:
        one = len(repeated) == 1
        them, their, labels = ("it", "its", "label") if one else ("them", "their", "labels")
        images, verb = "image" if len(query) == 1 else "images", "is" if one else "are"
        warnings.warn(MetalearnWarning(
            f"{len(repeated)} of the {len(query)} query {images} {verb} also in the support set (e.g. {repeated[0]}): "
            f"the learner was given {them} with {their} {labels}, so {their} prediction{'' if one else 's'} (and an "
            f"accuracy counting {them}) {'does' if one else 'do'} not show how it classifies new images; query other "
            "images to test it"), stacklevel=caller_level())


def normalises_queries_together(learner: MetaLearner) -> bool:
    """Whether ``learner`` normalises a task's query images with their own batch statistics, so
    that each query's probabilities depend on the other queries classified with it (transductive
    batch norm, as it was trained and tested). True where both hold:

    - its network has a batch norm that uses the batch's statistics in eval mode: a
      :class:`~metalearn.models.BatchStatNorm` without running statistics to evaluate with
      (``running_at_eval``), or torch's batch norm without running statistics;
    - the adapted network's own output classifies the queries (:attr:`MetaLearner.fixed_ways`:
      one output per class, the support set only adapts the network), all of them in one batch:
      not where a ``transductive`` option is off (each query then goes with the support set
      alone). Methods that embed support and queries together (prototypes, attention over the
      support) have the support set in every batch and are not counted."""
    if not getattr(learner, "fixed_ways", False) or getattr(getattr(learner, "config", None), "transductive",
                                                            True) is False:
        return False
    for module in learner.modules():
        if isinstance(module, BatchStatNorm) and (module.running_mean is None or not module.running_at_eval):
            return True
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            return True
    return False


FEW_QUERIES = ".* normalises its query images together"  # the warning's words, to filter it by


def warn_of_few_queries(learner: MetaLearner, count: int, queries_per_task: int | None) -> None:
    """A warning when ``learner`` normalises its queries together (:func:`normalises_queries_together`)
    and is given fewer than a task of its run had: the statistics of a few images are not those
    it learned with, so its probabilities, however confident, can mislead (the same image can
    get 0.31 alone and 0.99 among five). ``queries_per_task``: the run's query images per task
    (ways times query per class; the fewer of training's and testing's); None: one per class,
    the fewest a run has."""
    if not normalises_queries_together(learner):
        return
    problem = getattr(learner, "problem", None)
    least = queries_per_task if queries_per_task is not None else problem.output_dim if problem is not None else None
    if least is None or count >= least:
        return
    name = getattr(learner, "name", type(learner).__name__)
    had = f"the {least} of a task of its run" if queries_per_task is not None else f"one per class ({least})"
    warnings.warn(MetalearnWarning(
        f"{name} normalises its query images together (batch statistics, as in training), so each one's "
        f"probabilities depend on the others classified with it: {count} query "
        f"{'image is' if count == 1 else 'images are'} fewer than {had}, and the probabilities can mislead; "
        f"classify at least {least} query images together"),
        stacklevel=caller_level())


def query_chunks(count: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``count`` queries that one pass classifies, with the whole
    support set: as few chunks as hold at most :data:`QUERY_CHUNK` queries each, of equal sizes
    (to one query), in order. Equal, so that a learner that normalises its queries together
    (batch statistics) never classifies a small last chunk (257 queries: one image) by that
    chunk's statistics alone. The one split of ``metalearn predict`` and
    :meth:`~metalearn.algorithms.MetaLearner.fit_predict`, which so give the same answers for any
    number of queries (the statistics of a chunk, and the models a sampling method draws chunk
    after chunk, are the same)."""
    if count <= 0:
        return []
    chunks = -(-count // QUERY_CHUNK)
    bounds = [count * i // chunks for i in range(chunks + 1)]
    return list(zip(bounds, bounds[1:]))


def check_pass_fits(learner: MetaLearner, classify: Any, support_x: torch.Tensor, support_y: torch.Tensor,
                    query_x: torch.Tensor) -> None:
    """Refuse, in one line, a support set too large for the memory a pass of
    :func:`predict_new_classes` can use, before the pass: each pass holds the whole support set
    (embedded with the queries, or adapted to), and cannot take it in parts without changing
    the answers of methods that normalise with a task's batch statistics. Filling the memory
    would instead end in the kernel's out-of-memory kill, without a word (a conv4 pass holds
    megabytes of activations per support image at 84x84). Checked only above
    :data:`MEASURE_SUPPORT_ABOVE` support images: a pass with :data:`PROBE_SUPPORT` support
    images (taken from the classes in turns, :func:`_probe_support`) and the queries in the same
    share is measured (:func:`~metalearn.memory_budget.peak_memory_of`, the largest of
    :data:`PROBE_READINGS` readings) and scaled in proportion to the whole set; an estimate
    beyond :data:`REFUSE_ABOVE` times the memory available (a coarse estimate: see there) is
    refused. In proportion, not extrapolated from the difference of two probe sizes: a
    difference of two noisy readings, multiplied by the images beyond them, can come out near
    zero, and the estimate with it. Where the memory
    cannot be known or measured (not Linux, no ``/proc/self/clear_refs``, a device other than a
    CPU or CUDA GPU) nothing is checked. ``classify(support_x, support_y, query_x)``: the pass."""
    from metalearn.algorithms.base import device_of
    from metalearn.memory_budget import available_memory, peak_memory_of

    total = len(support_y)
    if total <= MEASURE_SUPPORT_ABOVE:
        return
    device = device_of(learner)
    index = _probe_support(support_y, PROBE_SUPPORT, getattr(learner, "fixed_ways", False))
    labels = torch.unique(support_y[index], return_inverse=True)[1]  # the classes taken, as 0..m-1
    # the queries in the same share as the support images, so that both parts of the pass scale:
    # all of them beside a quarter of the support images would count the queries' part four times
    queries = query_x[:max(1, round(len(query_x) * len(index) / total))]
    try:
        peak = max(peak_memory_of(lambda: classify(support_x[index], labels, queries), device)
                   for _ in range(PROBE_READINGS))
        available = available_memory(device)
    except OptionError:  # the memory is not known here (another system or device): nothing to check
        return
    # more than PROBE_SUPPORT images where a method with fixed ways needs every class once, up
    # to the whole set (then the measured pass was the whole one)
    needed = peak * total / len(index)
    if needed > REFUSE_ABOVE * available:
        fewer = ("fewer images per class" if getattr(learner, "fixed_ways", False)
                 else "fewer classes or images per class")
        raise MetalearnError(
            f"classifying with the {total} support images takes about {needed / 1e9:.3g} GB of memory (every pass "
            f"holds the whole support set, with up to {len(query_x)} query images), far more than the "
            f"{available / 1e9:.3g} GB available; give a support folder with {fewer}")


def _probe_support(labels: torch.Tensor, size: int, fixed_ways: bool) -> torch.Tensor:
    """The indices of ``size`` support images for :func:`check_pass_fits`, taken class by class
    in turns (the first image of every class, then the second, ...), so that the measured pass
    holds as many of the classes as it can, as the whole one holds them all; every class at least
    once where a method with fixed ways needs them all (then more than ``size`` where it has more
    classes)."""
    classes = int(labels.max()) + 1
    members = [torch.nonzero(labels == c).flatten().tolist() for c in range(classes)]
    taken: list[int] = []
    for turn in range(max(len(m) for m in members)):
        for images in members:
            if turn < len(images) and (len(taken) < size or fixed_ways and turn == 0):
                taken.append(images[turn])
    return torch.tensor(sorted(taken))


class Predictions(dict):
    """What :func:`predict_new_classes` found, as a dict of plain values (what :func:`as_json`
    writes), with the prepared tensors beside it as ``images``: (support images, support
    labels, the first :data:`SHEET_QUERIES` query images), for :func:`contact_sheet`, or None
    where they were dropped."""

    images: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def predict_new_classes(learner: MetaLearner, support: Path | str, query: list[Path | str],
                        image_size: int, channels: int, num_samples: int | None = None,
                        queries_per_task: int | None = None) -> Predictions:
    """Classify every query image among the support folder's classes.

    Returns ``{"classes": [...], "shots": [...], "predictions": [{"file", "label", "probability",
    "probabilities": {class: p}, ["spread", "spreads"], ["true"]}], ["accuracy"]}``: for a
    method that samples models (PLATIPUS) ``probability`` is the mean over the samples and
    ``spread`` their standard deviation. ``true`` is set where a query image sits in a folder
    named like a support class (then ``accuracy`` is given too). The result is a
    :class:`Predictions`, whose ``images`` are the prepared support images, support labels and
    the first :data:`SHEET_QUERIES` query images (for :func:`contact_sheet`, which shows no
    more; not a key, so not written by :func:`as_json`).

    ``support``: a folder with one sub-folder per class (at least 2), each holding 1 or more
    images; ``query``: image files and folders (searched recursively). Images are prepared
    with ``learner.prepare_images`` at ``image_size`` and ``channels``, as the run's training
    images were. ``num_samples``: models sampled per task, for a learner that samples models
    (None: its own default). ``queries_per_task``: the query images of a task of the run (ways
    times query per class), below which a learner that normalises its queries together is
    warned of (:func:`warn_of_few_queries`; None: below one per class). Queries are classified
    in the chunks of :func:`query_chunks` (at most :data:`QUERY_CHUNK`, of equal sizes), each
    with the whole support set, as ``learner.fit_predict`` classifies them: its answers are
    fit_predict's with all the query images (for PLATIPUS, the mean of the same sampled models).
    The learner's train / eval mode is restored afterwards. Raises
    :class:`MetalearnError` for a support or query path that :func:`read_support` or
    :func:`read_query` refuses (missing, no class folders, one class, no images) and for a
    file that is not a readable image."""
    names, files = read_support(support)
    query_files = read_query(query)
    warn_of_query_in_support(files, query_files)
    warn_of_few_queries(learner, len(query_files), queries_per_task)
    support_x = learner.prepare_images([f for group in files for f in group], image_size, channels)
    support_y = torch.tensor([c for c, group in enumerate(files) for _ in group])
    sampling = can(learner, "samples models")
    means, spreads, query_images = [], [], []
    # the models a sampling learner draws: fit_predict's stream, drawn on from one chunk to the next
    generator = prediction_generator()
    with evaluating(learner):  # the caller's mode comes back afterwards
        # fit_predict's chunks (query_chunks): each chunk given to fit_predict is one pass of it, so
        # the answers are those of fit_predict with all the queries

        def classify(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
            """One pass: probabilities (samples, queries, ways) where the learner samples models."""
            if sampling:
                with torch.no_grad():
                    return learner.sample_probabilities(support_x, support_y, query_x, num_samples, generator)
            with warnings.catch_warnings():  # said above, for all the queries, with the run's count
                warnings.filterwarnings("ignore", FEW_QUERIES, MetalearnWarning)
                return learner.fit_predict(support_x, support_y, query_x)

        for start, stop in query_chunks(len(query_files)):
            query_x = learner.prepare_images(query_files[start:stop], image_size, channels)
            if start == 0:  # before the first pass, whose memory every pass needs
                drawn = generator.get_state()  # the measured passes leave the models sampled as they were
                check_pass_fits(learner, classify, support_x, support_y, query_x)
                generator.set_state(drawn)
            # the contact sheet shows the first SHEET_QUERIES: only those are kept (every prepared
            # image kept was 150 KB at 84x84 RGB, 15 GB for 100,000 queries)
            kept = SHEET_QUERIES - sum(len(images) for images in query_images)
            if kept > 0:
                query_images.append(query_x[:kept].clone())
            found = classify(support_x, support_y, query_x)
            if sampling:
                means.append(found.mean(0).cpu())
                spreads.append(found.std(0, unbiased=False).cpu())
            else:
                means.append(found.cpu())
    probabilities = torch.cat(means)
    spread = torch.cat(spreads) if sampling else None
    predictions = []
    for i, path in enumerate(query_files):
        best = int(probabilities[i].argmax())
        entry: dict[str, Any] = {
            "file": str(path), "label": names[best], "probability": float(probabilities[i, best]),
            "probabilities": {name: float(p) for name, p in zip(names, probabilities[i])},
        }
        if spread is not None:
            entry["spread"] = float(spread[i, best])
            entry["spreads"] = {name: float(s) for name, s in zip(names, spread[i])}
        if path.parent.name in names:
            entry["true"] = path.parent.name
        predictions.append(entry)
    result = Predictions(classes=names, shots=[len(group) for group in files], predictions=predictions)
    labelled = [p for p in predictions if "true" in p]
    if labelled:
        result["accuracy"] = sum(p["label"] == p["true"] for p in labelled) / len(labelled)
    result.images = (support_x, support_y, torch.cat(query_images))
    return result


OUTPUT_EXAMPLES = {"--json": "predictions.json", "--csv": "predictions.csv", "--sheet": "predictions.png"}
# predict_run's outputs, as Python and the command line name them
OUTPUTS = {"json_out": ("json_out", "--json"), "csv_out": ("csv_out", "--csv"), "sheet": "sheet"}


def check_output_file(option: str | tuple[str, str], path: Path | str, example: str, suffix: str | None = None
                      ) -> None:
    """:func:`~metalearn.files.check_writable_file` for the output file that ``option`` names
    (as :class:`~metalearn.errors.Options` takes it: ``("json_out", "--json")``), refused with
    the option spelled as its caller spells it."""
    python, command_line = spelled({"option": option})["option"]
    try:
        check_writable_file(command_line, path, example, suffix)
    except MetalearnError as err:  # its message begins with the option it was given
        raise OptionError("{option}" + str(err).removeprefix(command_line), option=(python, command_line)) from None


def check_outputs(named: list[tuple[str | tuple[str, str], Path | str]]) -> None:
    """Refuse, before any image is read, output files that could not all be written: two
    options naming one file (one would overwrite the other), a folder (also ``out/``, not made
    yet), a contact sheet not named ``.png``, a path below a file, or a folder this user cannot
    write to (missing folders are made when the files are written). ``named``: (option, path)
    pairs such as ``(OUTPUTS["json_out"], "out.json")``, the paths as given, each option as
    :class:`~metalearn.errors.Options` takes it."""
    for option, path in named:
        command_line = spelled({"option": option})["option"][1]
        check_output_file(option, path, OUTPUT_EXAMPLES.get(command_line, "predictions"),
                          ".png" if command_line == "--sheet" else None)
    for i, (option, path) in enumerate(named):
        for other, other_path in named[i + 1:]:
            if same_path(path, other_path):
                raise OptionError(f"{{option}} and {{other}} both name {path}; give each output its own file",
                                  option=option, other=other)


def refuse_run_files(outputs: list[tuple[str | tuple[str, str], Path | str]]) -> None:
    """Refuse, before any checkpoint is read, an output file that is one of a run folder's own
    files (:data:`~metalearn.run_files.RUN_OWN_FILES`, an evaluation ``eval*.json``) or lies in its ``best/``: the run
    would no longer load, resume or show its scores. Any run's folder (one with a config.json or
    a checkpoint), not only the one read: compare reads several, and another run's folder is as
    easily mistyped. Other names in a run folder, and its ``plots/``, are the user's to write.
    Each output is (its option, as :class:`~metalearn.errors.Options` takes it, its path)."""
    from metalearn.runs import RunDir

    for option, out in outputs:
        given = valued(option, out)
        target = Path(out).expanduser().resolve()
        for folder in target.parents:
            run = RunDir(folder)
            if not (run.exists() or run.has_checkpoint()):
                continue
            if target.parent == folder and target.name in RUN_OWN_FILES:
                raise OptionError(f"{{output}} would replace {target.name}, one of the files of the run {folder}: the "
                                  f"run would no longer load or resume; give another file, e.g. in {run.plots_dir}",
                                  output=given)
            if target.parent == folder and fnmatch.fnmatchcase(target.name, EVAL_PATTERN):
                raise OptionError(f"{{output}} would replace {target.name}, an evaluation of the run {folder}: its "
                                  f"recorded score would be lost; give another file, e.g. in {run.plots_dir}",
                                  output=given)
            if target.is_relative_to(run.best_dir.resolve()):
                raise OptionError(f"{{output}} lies in {run.best_dir}, where the run {folder} keeps its best "
                                  f"checkpoints; give another file, e.g. in {run.plots_dir}", output=given)


def refuse_outputs_among_inputs(outputs: list[tuple[str | tuple[str, str], Path | str]],
                                inputs: list[tuple[str | tuple[str, str], Path | str]] = (),
                                trained_on: list[tuple[Path | str, Path | str | None]] = ()) -> None:
    """Refuse, before any image is read, an output file (as :func:`refuse_run_files` takes
    them) among the images a command reads:

    - one of the ``inputs`` (an image file), or a file in an input folder: writing it would
      destroy the user's image, or put a file among them that a later read takes for one;
    - a file in an image folder a run trained on (``trained_on``: (run folder, folder) pairs,
      the folder as the run's checkpoint records it, or None): the run's next resume would find
      its data changed, and a contact sheet would be read as an image of a class."""
    for option, out in outputs:
        given = valued(option, out)
        target = Path(out).expanduser().resolve()
        for source_option, source in inputs:
            if not str(source):  # an empty path: refused as such when it is read
                continue
            source = Path(source).expanduser()  # "~/chars", read as the user's folder, is compared as that
            resolved = source.resolve()
            if target == resolved or (source.is_dir() and target.is_relative_to(resolved)):
                where = "is" if target == resolved else "lies in"
                raise OptionError(f"{{output}} {where} the {{input}} input {source}: write it elsewhere, outside the "
                                  "images", output=given, input=source_option)
        for run_dir, images in trained_on:
            if images is not None and target.is_relative_to(Path(images).expanduser().resolve()):
                raise OptionError(f"{{output}} lies in {images}, the image folder the run {run_dir} trained on: "
                                  "the run's next read would see another dataset; write it elsewhere, outside the "
                                  "images", output=given)


def write_together(outputs: list[tuple[Path, bytes]]) -> None:
    """Write every ``(path, bytes)`` so that a failure leaves none of them half done
    (:func:`metalearn.files.atomic_write_files`: all are written and flushed before any is
    renamed into place), making the folders they need; a failure removes every folder this call
    made and leaves the files already there as they were."""
    made: list[Path] = []  # folders made here, removed again on a failure
    try:
        for folder in dict.fromkeys(Path(path).parent for path, _ in outputs):
            made += make_folders(folder)
        atomic_write_files(outputs)
    except BaseException as err:
        for folder in sorted(set(made), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: never a folder someone else filled meanwhile
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(Path(err.filename or outputs[0][0]), err) from None
        raise


def as_json(result: dict[str, Any]) -> bytes:
    return (json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2) + "\n").encode()


def as_csv(result: dict[str, Any]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    spread = any("spread" in p for p in result["predictions"])
    writer.writerow(["file", "label", "probability"] + (["spread"] if spread else []) + ["true"])
    for p in result["predictions"]:
        writer.writerow([p["file"], p["label"], f"{p['probability']:.6f}"]
                        + ([f"{p['spread']:.6f}"] if spread else []) + [p.get("true", "")])
    # a name of undecodable bytes (Python keeps them as surrogates) is written back as those bytes
    return out.getvalue().encode("utf-8", "surrogateescape")


def _drawable(text: str) -> str:
    """``text`` with the undecodable bytes of a file or folder name (surrogates, which a figure's
    text cannot hold) as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


SHEET_COLUMNS = 12  # the most images in a row of the contact sheet
SHEET_CLASSES = 20  # the most support classes it shows, a row each
SHEET_QUERIES = 120  # the most query images it shows (ten full rows): every one is in --json and --csv


def contact_sheet(result: Predictions, title: str = "") -> bytes:
    """A PNG: the support images by class (one row each, up to :data:`SHEET_COLUMNS`, for the
    first :data:`SHEET_CLASSES` classes), then the query images (the first
    :data:`SHEET_QUERIES`), each with its predicted class and probability (green when it
    matches the folder it came from, red when not, black when unknown). A sheet that leaves
    images out says what in its title, so that its size is bounded whatever the folders hold."""
    from metalearn.plotting import _figures

    plt = _figures()
    if getattr(result, "images", None) is None:
        raise MetalearnError("contact_sheet draws the images of predict_new_classes's result; this one holds none")
    support_x, support_y, query_x = result.images
    every, predictions = result["predictions"], result["predictions"][:SHEET_QUERIES]
    names = result["classes"][:SHEET_CLASSES]
    columns = min(max(8, max(result["shots"])), SHEET_COLUMNS)
    left_out = [f"support images past the first {columns} of a class"] if max(result["shots"]) > columns else []
    if len(result["classes"]) > len(names):
        left_out.append(f"the support images of {len(result['classes']) - len(names)} of {len(result['classes'])} "
                        "classes")
    if len(every) > len(predictions):
        left_out.append(f"{len(every) - len(predictions)} of {len(every)} query images (all are in --json and --csv)")
    if left_out:
        title = (f"{title}\n" if title else "") + "not shown: " + "; ".join(left_out)
    query_rows = -(-len(predictions) // columns)
    rows = len(names) + query_rows
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.45 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def show(ax, image):
        pixels = image.permute(1, 2, 0).numpy()
        ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=1)

    for c, name in enumerate(names):
        for k, image in enumerate(support_x[support_y == c][:columns]):
            show(axes[c, k], image)
            if k == 0:
                axes[c, k].set_title(_drawable(f"support: {name}"), fontsize=7, loc="left")
    for i, p in enumerate(predictions):
        ax = axes[len(names) + i // columns, i % columns]
        show(ax, query_x[i])
        colour = "black" if "true" not in p else ("green" if p["true"] == p["label"] else "red")
        spread = f" ±{p['spread']:.2f}" if "spread" in p else ""
        ax.set_title(_drawable(f"{p['label']} {p['probability']:.2f}{spread}"), fontsize=7, color=colour)
    if title:
        fig.suptitle(_drawable(title), fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
