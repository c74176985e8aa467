"""The ``metalearn`` command. Thin: parses options, calls the Python API, prints."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import math
import os
import re
import sys
import time
import typing
import warnings
from pathlib import Path

import click
from click.core import ParameterSource
from click.exceptions import NoArgsIsHelpError

from metalearn.algorithms import METHODS
from metalearn.algorithms.base import MAX_SAMPLES
from metalearn.config import MAX_EPISODES, MAX_SEED, TaskConfig, TrainConfig
from metalearn.distributed import leave_world, reports
from metalearn.errors import (TIME_LIMIT_EXIT, ConfigError, MetalearnError, MetalearnWarning, OptionError, Options,
                              OptionLine, STOP_SIGNALS, Terminated, TrainingInterrupted, TrainingStopped,
                              first_line, flag, size_overflow_in, spellings, stopped_by)
from metalearn.files import check_writable_file
from metalearn.options import help_of
from metalearn.plugins import load_plugins, unknown_hint
from metalearn.runs import EvaluationSuperseded, RunDir, json_finite
from metalearn.runtime import DroppingStream, show_progress, tune_allocator
from metalearn.tasks.batch import data_fix

FAST_GPU_HELP = ("on a GPU, keep torch's default kernels (TF32 convolutions, non-deterministic cuDNN "
                 "algorithms): faster, but MAML's meta-gradient loses accuracy and a resumed run no longer "
                 "repeats the uninterrupted one exactly")
DEVICE_HELP = ("cpu, cuda (under torchrun: each rank's GPU, NCCL), cuda:N or auto; not part of the run, "
               "which resumes or evaluates on any device")
# compare and predict work in one process, not split among torchrun's ranks
ONE_PROCESS_DEVICE_HELP = ("cpu, cuda, cuda:N or auto: where this command computes, in one process; any device "
                           "takes any run")
CACHE_HELP = "the cache folder: $METALEARN_CACHE, else $XDG_CACHE_HOME/metalearn, else ~/.cache/metalearn"
OMNIGLOT_DIR = ("the folder with images_background.zip / images_evaluation.zip (default: $METALEARN_DATA, "
                f"else omniglot/ in {CACHE_HELP})")
DATA_DIR_HELP = (f"omniglot: {OMNIGLOT_DIR}; folder and mini-imagenet: the image folder (required to start a run; "
                 "a run's evaluations and --resume read the folder its checkpoint records); generated tasks "
                 "(sinusoid, sine-or-line, the environments) take none")
# plot and export read images only for a Neural Statistician run's conditional-samples picture
PLOT_DATA_DIR_HELP = (f"a Neural Statistician run's images, for its conditional samples (omniglot: {OMNIGLOT_DIR}; "
                      "a folder run: the folder its checkpoint records); other runs need none")

PROGRESS_HELP = "show progress bars (default: when the error output is a terminal, not a log file)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="metalearn")
@click.option("--allocator", type=click.Choice(["tuned", "default"]), default="tuned", show_default=True,
              help="tuned: glibc keeps freed memory for reuse, which speeds up CPU meta-training (see the "
                   "performance docs) and keeps the process's peak memory until it exits; default: glibc's "
                   "own behaviour")
def cli(allocator):
    """metalearn: meta-learning (MAML and its peers), batched over tasks with torch.func."""
    if allocator == "tuned":
        tune_allocator()


# -- option generation from the config dataclasses ------------------------------------------


PAPER_DEFAULT = "(default: see --print-config)"


class Int64(click.types.IntParamType):
    """An integer torch can hold: a larger one would end in an overflow deep inside torch. The
    configs check the sensible range; this only keeps the help free of a 19-digit range."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not -(2**63) <= number < 2**63:
            self.fail(f"{number} does not fit in a 64-bit integer", param, ctx)
        return number


INTEGER = Int64()


class WordOrInt64(click.types.StringParamType):
    """Text that may be a whole number (``--task-chunk``: a number of tasks or ``auto``), kept as
    text for the config to read; a number is bounded as :class:`Int64`'s."""

    def convert(self, value, param, ctx):
        text = super().convert(value, param, ctx)
        if isinstance(text, str) and text.strip().isdigit():
            INTEGER.convert(text.strip(), param, ctx)
        return text


class OrNone(click.ParamType):
    """An option whose field may be None (``test_shots: int | None``, None: follow ``shots``):
    ``none`` sets it back to None, which leaving the flag out cannot do where a preset or the
    method's defaults set a value; anything else is ``base``'s."""

    def __init__(self, base: click.ParamType):
        self.base = base
        self.name = f"{base.name} or none"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == "none":
            return None
        return self.base.convert(value, param, ctx)

    def get_metavar(self, param, ctx=None):
        return f"{self.base.name.upper()}|none"


class Duration(click.ParamType):
    """A length of time, as seconds: ``5400``, ``90m``, ``1h30m``, ``2d``, or ``1:30:00`` (hours,
    minutes and seconds, as batch schedulers write their limits) with days before a dash
    (``1-12:00:00``, ``2-12``: Slurm's days-hours[:minutes[:seconds]]). Every part of the
    colon form, and of the unit form, is a number of at least 0."""

    name = "duration"
    UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    SLURM_DAYS = re.compile(r"^\d+(\.\d+)?-[\d:.]+$")  # days-hours[:minutes[:seconds]]; 1e-3 is no such

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        try:
            if isinstance(value, (int, float)):
                seconds = float(value)
            elif ":" in text or self.SLURM_DAYS.match(text):
                days, dash, clock = text.partition("-") if self.SLURM_DAYS.match(text) else ("0", "", text)
                parts = [float(part) for part in clock.split(":")]
                if len(parts) > 3 or any(part < 0 for part in parts) or float(days) < 0:
                    raise ValueError
                if dash:  # days-hours[:minutes[:seconds]]: the first part after the dash is hours
                    parts += [0.0] * (3 - len(parts))
                seconds = float(days) * 86400 + sum(part * 60 ** i for i, part in enumerate(reversed(parts)))
            elif text and text[-1] in self.UNITS:
                seconds, number = 0.0, ""
                for char in text:
                    if char in self.UNITS:
                        if not number or number.strip().startswith("-"):  # 2h-1h: no part is negative, as above
                            raise ValueError
                        seconds, number = seconds + float(number) * self.UNITS[char], ""
                    else:
                        number += char
            else:
                seconds = float(text)
        except ValueError:
            self.fail(f"{value!r} is not a length of time (examples: 5400, 90m, 1h30m, 1:30:00, 1-12:00:00)", param,
                      ctx)
        if not 0 < seconds < float("inf"):
            self.fail(f"{value!r} is not a positive length of time", param, ctx)
        return seconds


class GivenPath(click.Path):
    """A path as every path option and argument of the command takes it: refused when empty
    (``--run-dir ''``, an unset shell variable in quotes), which ``Path`` would read as the
    current folder, so that a run, an export or a read would land there unasked. ``what`` names
    what to give instead; ``path_type=None`` keeps the text as typed (``"out/"`` names a
    folder)."""

    def __init__(self, what: str, path_type: type | None = Path):
        super().__init__(path_type=path_type)
        self.what = what

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            # a MetalearnError, not click's "Invalid value for ...": one line, as predict words it
            raise MetalearnError(f"{_spelled(param)} is empty; give {self.what}")
        return super().convert(value, param, ctx)


def _spelled(param: click.Parameter | None) -> str:
    """A parameter as the command line spells it: ``--run-dir``, ``RUN_DIR``; ``one of RUN_DIRS``
    for an argument that takes several."""
    if param is None:
        return "a path"
    if isinstance(param, click.Option):
        return param.opts[0]
    name = (param.name or "path").upper()
    return name if param.nargs == 1 else f"one of {name}"


FOLDER, RUN, FILE = "a folder path", "a run folder", "a file path"
IMAGES = "an image file or folder"  # the words of predict_run's own refusal


def _option_for(field: dataclasses.Field, paper_default: bool = False, hidden: bool = False,
                help_text: str | None = None) -> click.Option:
    """The flag of a config field: its name with dashes, its type, and the help declared next to
    the field (:func:`metalearn.options.option`), or ``help_text``. Options of the method and of
    training default to the paper's value for the task, which depends on the other options:
    --print-config shows what a command line resolves to. ``hidden``: parsed as any other, but
    left out of the help (an option the command's tasks all refuse, each in its own words)."""
    name = flag(field.name)
    hint = field.type if isinstance(field.type, type) else _resolve(field.type)
    text = help_of(field) if help_text is None else help_text
    if paper_default and field.name != "init_from":
        text = f"{text} {PAPER_DEFAULT}".strip()
    elif not text:
        text = f"(default {field.default})"
    if hint is bool:
        return click.Option([f"{name}/--no-{name[2:]}"], default=None, help=text, hidden=hidden)
    click_type = GivenPath(PATH_FIELDS[field.name], None) if field.name in PATH_FIELDS else \
        {int: INTEGER, float: click.FLOAT, str: click.STRING}.get(hint, click.STRING)
    if click_type is click.STRING and "int" in str(field.type).replace(" ", "").split("|"):  # str | int
        click_type = WordOrInt64()
    if _may_be_none(field) and field.name not in PATH_FIELDS:
        click_type = OrNone(click_type)
    names = [name] + [flag(alias) for alias in field.metadata.get("aliases", ())]
    return click.Option(names + [field.name], type=click_type, default=None, show_default=False, help=text,
                        hidden=hidden)


def _may_be_none(field: dataclasses.Field) -> bool:
    """Whether the field's annotation allows None (``int | None``), as a string or a type."""
    annotation = field.type
    if isinstance(annotation, str):
        return "None" in annotation.replace(" ", "").split("|")
    return type(None) in typing.get_args(annotation)


def _resolve(annotation: str):
    text = str(annotation).replace(" ", "")
    for name, value in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return value
    return str


# config fields that hold a path: refused when empty as every path option is ("" is also their
# unset default, so `--init-from ''` would silently train from scratch)
PATH_FIELDS = {"split_file": "a JSON file", "init_from": RUN}
TASK_FIELDS = list(dataclasses.fields(TaskConfig))
TRAIN_FIELDS = list(dataclasses.fields(TrainConfig))


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _environments_help(method: str) -> tuple[frozenset[str], str | None]:
    """For a reinforcement-learning method (``reinforcement``), what its help leaves out and
    says instead: the options that every environment refuses (the ``inapplicable`` task options
    of all reinforcement-learning datasets, and ``data_dir`` where all are generated), and the
    help of ``--env`` (``--dataset``) naming the environments alone. A supervised method's
    datasets differ in what they take: its help lists every option, as it was (``frozenset()``,
    None). The options left out are still parsed, so that one given is refused by the
    environment, in its words (``--ways does not apply to nav2d, ...``), not as unknown."""
    from metalearn.datasets import DATASETS

    cls = METHODS[method]
    environments = {name: dataset for name, dataset in DATASETS.items() if dataset.reinforcement}
    if not cls.reinforcement or not environments:
        return frozenset(), None
    refused = frozenset.intersection(*(frozenset(dataset.inapplicable) for dataset in environments.values()))
    if all(dataset.generated for dataset in environments.values()):
        refused |= {"data_dir"}
    names = [f"{name} (its default)" if name == cls.default_dataset else name for name in environments]
    listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    return refused, f"the environment: {listed}"


def _plugins_help(method: str, field: dataclasses.Field, text: str | None) -> str | None:
    """``text`` (None: the field's own help) with the names that plugins registered and the
    option takes for ``method`` added, for ``--dataset`` (a supervised method: the environments
    are listed whole) and ``--model`` (the networks the method's Config accepts): the fields'
    own help was written when metalearn was imported and lists the built-in names alone."""
    from metalearn.datasets import BUILT_IN_DATASETS, DATASETS
    from metalearn.models import BUILT_IN_NETWORKS, NETWORKS

    cls = METHODS[method]
    if field.name == "dataset" and text is None:
        added = [name for name, dataset in DATASETS.items()
                 if name not in BUILT_IN_DATASETS and dataset.reinforcement == cls.reinforcement
                 and (dataset.classification or not cls.classification_only)]
    elif field.name == "model" and field in dataclasses.fields(cls.Config):
        added = []
        for name in (name for name in NETWORKS if name not in BUILT_IN_NETWORKS):
            try:
                cls.Config(**{field.name: name})
            except Exception:  # a network this method cannot use (its own check refuses it): not listed
                continue
            added.append(name)
    else:
        return text
    own = help_of(field) if text is None else text
    # a plugin's own help may list what an earlier plugin registered (network_help() at its import)
    added = [name for name in added if not re.search(rf"(?:[:,] |\bor ){re.escape(name)}(?=[,;)]| or | \(|$)", own)]
    return f"{own}; of plugins: {', '.join(added)}" if added else text


def _make_train_command(method: str) -> click.Command:
    method_fields = dataclasses.fields(METHODS[method].Config)
    hidden, dataset_help = _environments_help(method)

    def run(**options):
        ctx = click.get_current_context()
        from metalearn.api import resolve_config, train

        given = lambda fields: {f.name: options[f.name] for f in fields if _given(ctx, f.name)}
        config = resolve_config(
            method,
            task=given(TASK_FIELDS),
            method_config=given(method_fields),
            train=given(TRAIN_FIELDS),
            resume_from=options["run_dir"] if options["resume"] else None,
            preset=options.get("preset"),
        )
        if options["print_config"]:  # what training would refuse, refused here too
            from metalearn.distributed import resolve_device
            from metalearn.training import build_trainer, check_stop_at

            resolve_device(options["device"])
            trainer = build_trainer(config, options["run_dir"], data_dir=options["data_dir"], resume=options["resume"],
                                    progress=False, lock=False, tested=options["eval"])
            if options["stop_at"] is not None:
                check_stop_at(options["stop_at"], trainer.step, config.train.steps, config.train.lr_anneal)
            click.echo(json.dumps(config.to_dict(), indent=2))
            return
        time_limit = options["time_limit"]
        if time_limit is not None and _WHOLE_PROCESS:  # from the command's start: its imports took time already
            from metalearn.runtime import process_age_s

            time_limit = max(time_limit - process_age_s(), 1e-3)
        run_dir, result = train(config, run_dir=options["run_dir"], data_dir=options["data_dir"],
                                resume=options["resume"], progress=show_progress(options["progress"]),
                                evaluate_after=options["eval"], device=options["device"],
                                announce=lambda line: click.echo(line.with_flags() if isinstance(line, OptionLine)
                                                                 else line),  # --steps 0 as the flag
                                exact_gpu_kernels=not options["fast_gpu_kernels"],
                                time_limit_s=time_limit, stop_at=options["stop_at"])
        if not reports():
            return  # under torchrun only rank 0 reports
        if result is not None:
            from metalearn.evaluation import format_result

            click.echo(format_result(result))
        click.echo(f"run directory: {run_dir}")

    params = [_option_for(f, hidden=f.name in hidden,
                          help_text=_plugins_help(method, f, dataset_help if f.name == "dataset" else None))
              for f in TASK_FIELDS]
    params += [_option_for(f, True, help_text=_plugins_help(method, f, None))
               for f in TRAIN_FIELDS + list(method_fields)]
    params += [
        click.Option(["--data-dir"], type=GivenPath(FOLDER), default=None, help=DATA_DIR_HELP,
                     hidden="data_dir" in hidden),
        click.Option(["--run-dir"], type=GivenPath(FOLDER), default=None,
                     help="where checkpoints and metrics go (default: a new folder <method>-<dataset>-<shape>-<time> "
                          f"in $METALEARN_RUNS, else runs/ in {CACHE_HELP})"),
        click.Option(["--resume"], is_flag=True, help="continue the run in --run-dir from its checkpoint"),
        click.Option(["--progress/--no-progress"], default=None, help=PROGRESS_HELP),
        click.Option(["--eval/--no-eval"], default=True, help="evaluate on the test split when done"),
        click.Option(["--time-limit"], type=Duration(), default=None,
                     help="stop with a checkpoint before this much time has passed since the command started "
                          "(5400, 90m, 1h30m, 1:30:00): the step that would end past it is not begun; exit "
                          f"status {TIME_LIMIT_EXIT}, continue with --resume (which takes its own limit)"),
        click.Option(["--stop-at"], type=int, default=None, metavar="STEP",
                     help="stop with a checkpoint after this meta-step of the run's schedule, without the "
                          "test evaluation; exit status 0, continue with --resume: runs of a long schedule "
                          "compared at equal steps"),
        click.Option(["--device"], default="cpu", show_default=True, help=DEVICE_HELP),
        click.Option(["--fast-gpu-kernels"], is_flag=True, help=FAST_GPU_HELP),
        *([click.Option(["--preset"], type=click.Choice(list(METHODS[method].presets)), default=None,
                        help="start from a named set of defaults instead of the paper's; options given "
                             "still override it: " + "; ".join(f"{name}: {text}" for name, text in
                                                               METHODS[method].presets.items()))]
          if METHODS[method].presets else []),
        click.Option(["--print-config"], is_flag=True,
                     help="print the full configuration these options resolve to (paper defaults "
                          "filled in) as JSON and exit without training"),
    ]
    return click.Command(method, callback=run, params=params,
                         help=f"Meta-train {method}: {_summary(method)} Unset options take the "
                              "paper's values for the task (--print-config shows them).")


def _summary(method: str) -> str:
    """The first paragraph of the method's module docstring (its name, paper and how it runs),
    for a method of the package; for one of a plugin, whose module may hold more than the
    method, of the class's own docstring first."""
    cls = METHODS[method]
    module = sys.modules.get(cls.__module__)
    own = cls.__dict__.get("__doc__") if not cls.__module__.startswith("metalearn.") else None
    doc = own or getattr(module, "__doc__", None) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


class MethodCommands(click.Group):
    """``metalearn train METHOD``: one command per registered method, made from the registry
    when it is asked for, so that a method registered after import (a user's own, with
    :func:`metalearn.algorithms.register_method`) is trainable with no edit here."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(METHODS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _make_train_command(name) if name in METHODS else None

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """The method's command; an unknown name lists the methods and how one of the user's is
        made known (a plugin not named is the likely cause)."""
        if args and not args[0].startswith("-") and args[0] not in METHODS:
            recorded = _recorded_method_remedy(args[0], args[1:])
            if recorded is not None:  # a --resume of a run that names where its method came from
                raise click.UsageError(f"no method {args[0]!r} in this process: {recorded}", ctx)
            raise click.UsageError(f"no method {args[0]!r}; the methods: {', '.join(METHODS)} ({unknown_hint()})",
                                   ctx)
        return super().resolve_command(ctx, args)


def _recorded_method_remedy(method: str, args: list[str]) -> str | None:
    """For ``metalearn train METHOD --resume --run-dir RUN`` of a method this process does not
    know: what RUN's config.json records of where it came from (a plugin to name, a module to
    move into one), as every other command reading the run says it; None where it records none."""
    from metalearn.plugins import remedy
    from metalearn.runs import recorded_entry

    if "--resume" not in args:
        return None
    given = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--run-dir"]
    given += [arg.split("=", 1)[1] for arg in args if arg.startswith("--run-dir=")]
    if not given or not given[-1]:
        return None
    entry = recorded_entry(RunDir(given[-1]).config_as_it_stands(), "method", method)
    return (remedy(entry) or None) if entry is not None else None


@cli.group(cls=MethodCommands)
def train():
    """Meta-train a method: metalearn train METHOD --dataset omniglot --ways 5 --shots 1."""


# -- eval / plot ------------------------------------------------------------------------------


def episode_shape_options(instead_of: str):
    """eval's and compare's --ways, --shots and --query, which replace ``instead_of``'s test
    episode shape; --ways names the methods that take other ways, from the registry."""
    any_ways = ", ".join(name for name, cls in METHODS.items() if not (cls.fixed_ways or cls.reinforcement))
    options = (
        click.option("--ways", type=INTEGER, default=None,
                     help=f"test episodes of this many classes instead of {instead_of} (the methods without a "
                          f"per-class output layer: {any_ways})"),
        click.option("--shots", type=INTEGER, default=None, help=f"support examples per class instead of {instead_of}"),
        click.option("--query", type=INTEGER, default=None,
                     help=f"query examples per class (points, for regression) instead of {instead_of}"),
    )

    def decorate(command):
        for option in reversed(options):  # as stacked decorators: listed in this order
            command = option(command)
        return command
    return decorate


def given_shape(ways: int | None, shots: int | None, query: int | None) -> dict[str, int]:
    """The episode shape options given (see :func:`episode_shape_options`)."""
    return {k: v for k, v in (("ways", ways), ("shots", shots), ("query", query)) if v is not None}


@cli.command("eval")
@click.argument("run_dir", type=GivenPath(RUN))
@click.option("--episodes", type=click.IntRange(1, MAX_EPISODES), default=None, help="test episodes (default: the run's --eval-episodes, in its config.json)")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="seed of the episodes (with --part val, the run's own seed redraws its validation episodes)")
@click.option("--part", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="the split part to score; val writes eval-part=val.json, train (the training "
                   "classes, in the test episodes' shape: the gap to the test score) eval-part=train.json")
@click.option("--data-dir", type=GivenPath(FOLDER), default=None, help=DATA_DIR_HELP)
@click.option("--set", "settings", multiple=True, metavar="OPTION=VALUE",
              help="change a method option for this evaluation, e.g. --set test_inner_steps=10 (not one that "
                   "changes the network, only starts a trained value, such as inner_lr under learn_inner_lr, or "
                   "acts only in meta-training, such as first_order)")
@episode_shape_options("the run's")
@click.option("--per-step/--final-only", default=True, show_default=True,
              help="also score the predictions after every adaptation step; --final-only gives the same "
                   "final score faster where those steps cost extra (Reptile, MAML, PLATIPUS: a sixth to two "
                   "fifths less time)")
@click.option("--progress/--no-progress", default=None, help=PROGRESS_HELP)
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
@click.option("--fast-gpu-kernels", is_flag=True, help=FAST_GPU_HELP)
@click.option("--ensemble", is_flag=True,
              help="score the average prediction of the best validation checkpoints the run kept (train "
                   "--keep-best N; MAML++'s model selection) instead of the latest checkpoint")
@click.option("--protocol", default=None, metavar="NAME",
              help="one of the method's own evaluation protocols instead of the standard episodes (the "
                   "Memory Module: lifelong); written to eval-protocol=NAME.json")
@click.option("--split-fractions", default=None, metavar="TRAIN,VAL,TEST",
              help="a run on class folders: these train,val,test fractions of --data-dir's classes instead of "
                   "the run's split (0,0,1 scores every class of another folder); written to "
                   "eval-split_fractions=....json")
@click.option("--split-file", type=GivenPath("a JSON file"), default=None,
              help="a run on class folders: split --data-dir's classes by this JSON file instead of the run's split")
def eval_command(run_dir, episodes, seed, part, data_dir, settings, ways, shots, query, per_step, progress, device,
                 fast_gpu_kernels, ensemble, protocol, split_fractions, split_file):
    """Evaluate a trained run: mean accuracy (or MSE) with a 95% confidence interval."""
    from metalearn.api import evaluate_run
    from metalearn.evaluation import format_result

    bars = show_progress(progress)
    where = {}  # the file written and the evaluation it replaced
    try:
        result = evaluate_run(run_dir, episodes=episodes, seed=seed, part=part, data_dir=data_dir,
                              progress=bars, overrides=dict(parse_setting(s) for s in settings), device=device,
                              episode_shape=given_shape(ways, shots, query), per_step=per_step,
                              exact_gpu_kernels=not fast_gpu_kernels, ensemble=ensemble, protocol=protocol,
                              split_fractions=split_fractions, split_file=split_file,
                              # into a log file, no bar: what the minutes before the score are
                              announce=None if bars else lambda text: click.echo(text, err=True),
                              written=lambda path, earlier: where.update(path=path, earlier=earlier))
    except EvaluationSuperseded as err:  # the score, though not filed, is shown: the evaluation took its time
        if reports() and err.result is not None:
            click.echo(format_result(err.result) if protocol is None else format_protocol_result(err.result))
        raise
    if reports():  # under torchrun rank 0 alone writes, and says so
        click.echo(format_result(result) if protocol is None else format_protocol_result(result))
        earlier = where["earlier"]
        click.echo(f"written to {where['path']}" + (f" (replacing the earlier evaluation there: {earlier})"
                                                    if earlier else ""))


def episode_shape_words(result: dict) -> str:
    """The shape of the episodes a result scored: "20-way 1-shot, 15 queries per class", or for
    regression "10 support and 10 query points"."""
    from metalearn.datasets import get_dataset

    if not get_dataset(result["dataset"]).classification:
        return f"{result['shots']} support and {result['query']} query points"
    return f"{result['ways']}-way {result['shots']}-shot, {result['query']} quer{'y' if result['query'] == 1 else 'ies'} per class"


def format_protocol_result(result: dict) -> str:
    """A protocol's result, one ``name: value`` line per score (lists of numbers on one line)."""
    lines = [f"protocol {result['protocol']} ({result['part']} part, step {result['step']})"]
    for key, value in result.items():
        if key in ("protocol", "part", "step", "method", "dataset"):
            continue
        if isinstance(value, (list, tuple)):
            value = " ".join(f"{v:.2f}" if isinstance(v, float) else "-" if v is None else str(v) for v in value)
        elif isinstance(value, float):
            value = f"{value:.2f}"
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def parse_setting(text: str) -> tuple[str, object]:
    """'test_inner_steps=10' -> ('test_inner_steps', 10); values are JSON, else strings. A
    text without "=" or without an option name before it is refused in one line."""
    key, equals, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not equals or not key:
        raise MetalearnError(f"--set {text}: give OPTION=VALUE, e.g. --set test_inner_steps=10")
    try:
        return key, json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return key, value


@cli.command()
@click.argument("run_dir", type=GivenPath(RUN))
@click.option("--data-dir", type=GivenPath(FOLDER), default=None, help=PLOT_DATA_DIR_HELP)
@click.option("--compare", "compare_with", type=GivenPath(RUN), default=None,
              help="another run on the same tasks: for PLATIPUS, a run (e.g. MAML) whose prediction is drawn "
                   "beside the samples; for maml-rl, a run of the same environment and test settings (e.g. "
                   "--inner-steps 0, the pretrained baseline) whose returns are drawn beside this run's")
@click.option("--out-dir", type=GivenPath(FOLDER), default=None,
              help="the folder to write the figures to (default RUN_DIR/plots); not, as export's OUT_DIR, the "
                   "run folder itself, its best/, another run's folder or the image folder it trained on")
@click.option("--until-step", type=click.IntRange(min=0), default=None, metavar="STEP",
              help="end the learning curves at this step (default: the last step logged)")
def plot(run_dir, data_dir, compare_with, out_dir, until_step):
    """Draw a run's learning curves (and, for regression, fits after 0/1/10 steps; for PLATIPUS,
    sampled functions; for maml-rl, returns after each policy-gradient step, also of the
    initial weights, stored as eval-weights=initial.json, and trajectories or velocities) as PNG."""
    from metalearn.api import plot_run

    for path in plot_run(run_dir, data_dir=data_dir, compare_with=compare_with, out_dir=out_dir,
                         until_step=until_step):
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=GivenPath(RUN))
@click.option("--episodes", type=click.IntRange(1, MAX_EPISODES), default=600, show_default=True)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="seed of the episodes")
@click.option("--part", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="the split part whose episodes to score: the ones metalearn eval --part scores")
@click.option("--samples", "num_samples", type=click.IntRange(min=1), default=None, help="models sampled per task (sampling methods)")
@click.option("--json", "json_path", type=GivenPath(FILE, None), default=None,
              help="also write the result here (-: print it as JSON instead of the table)")
@click.option("--set", "settings", multiple=True, metavar="OPTION=VALUE",
              help="change a method option of every run for this comparison, e.g. --set test_inner_steps=1")
@click.option("--data-dir", type=GivenPath(FOLDER), default=None, help=DATA_DIR_HELP)
@episode_shape_options("the runs' (runs trained with other shots compared on one shape)")
@click.option("--progress/--no-progress", default=None, help=PROGRESS_HELP)
@click.option("--device", default="cpu", show_default=True, help=ONE_PROCESS_DEVICE_HELP)
def compare(run_dirs, episodes, seed, part, num_samples, json_path, settings, data_dir, ways, shots, query, progress,
            device):
    """Uncertainty measures of trained runs on the same test episodes: for classification
    accuracy, NLL and expected calibration error; for regression MSE, predictive
    log-likelihood and coverage of the true function by the sampled functions."""
    from metalearn.uncertainty import compare_learners, run_labels

    labels = run_labels(run_dirs)
    overrides = dict(parse_setting(s) for s in settings)
    to_output = json_path == "-"  # the JSON alone on the output, for a script (as status --json)
    if to_output:
        json_path = None
    if json_path:  # found out now, not after minutes of evaluation
        from metalearn.checkpoints import recorded_images
        from metalearn.prediction import refuse_outputs_among_inputs, refuse_run_files
        from metalearn.runs import RunDir

        check_writable_file("--json", json_path, "compare.json")
        refuse_run_files([(("json", "--json"), json_path)])  # before any run's checkpoint is read
        refuse_outputs_among_inputs([(("json", "--json"), json_path)], [("data_dir", data_dir)] if data_dir else [],
                                    trained_on=[(run, recorded_images(RunDir(run))) for run in run_dirs])
    shape = given_shape(ways, shots, query)
    result = compare_learners(labels, episodes=episodes, seed=seed, part=part, num_samples=num_samples,
                              data_dir=data_dir, overrides=overrides, episode_shape=shape, device=device,
                              progress=show_progress(progress))
    measures = [k for k, v in result[next(iter(labels))].items() if isinstance(v, dict)]
    text = comparison_json(result, labels)
    if to_output:
        click.echo(text)
    else:
        echo_comparison(result, labels, measures, part, seed)
    if json_path:
        from metalearn.files import atomic_write_bytes

        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        # never half a file; standard JSON (null for a diverged run's NaN), which any parser reads
        atomic_write_bytes(json_path, (text + "\n").encode())
        click.echo(f"written to {json_path}")


def one_model(result: dict, label: str) -> bool:
    """Whether compare's run ``label`` drew one model per task (a method without samples): its
    coverage of the true function is 0 by definition, an empty band, not a finding."""
    return result[label].get("num_samples") == 1


def comparison_json(result: dict, labels: dict) -> str:
    """compare's ``result`` as standard JSON (null for a diverged run's NaN) that reads as its
    table: a coverage that the table shows as n/a, of a run that drew one model per task, and a
    paired difference of a coverage from or of such a run, has null for its mean and interval."""
    result = copy.deepcopy(result)
    first = next(iter(labels))
    for label in labels:
        for name, measure in result[label].items():
            if not (name.startswith("coverage_") and isinstance(measure, dict)):
                continue
            if one_model(result, label):
                measure.update(mean=None, ci95=None)
            if isinstance(measure.get("difference"), dict) and (one_model(result, label) or one_model(result, first)):
                measure["difference"].update(mean=None, ci95=None)
    return json.dumps(json_finite(result), indent=2, allow_nan=False)


def echo_comparison(result: dict, labels: dict, measures: list[str], part: str, seed: int) -> None:
    """compare's tables: each run's measures, then each later run's paired differences."""
    click.echo(f"{result['episodes']} {part} episodes of {result['dataset']} ({episode_shape_words(result)}), seed {seed}")
    click.echo("| run | " + " | ".join(measures) + " |")
    click.echo("| --- |" + " ---: |" * len(measures))
    for label in labels:
        cells = []
        for m in measures:
            value = result[label][m]
            ci = value.get("ci95")
            if m.startswith("coverage_") and one_model(result, label):
                cells.append("n/a")  # one function per task covers no band: 0 by definition, not a finding
                continue
            cells.append(f"{value['mean']:.4g}" + (f" +/- {ci:#.2g}" if ci is not None else ""))
        click.echo(f"| {label} | " + " | ".join(cells) + " |")
    paired = [m for m in measures if any("difference" in result[label][m] for label in labels)]
    if paired:  # the same episodes: the per-episode differences say whether two runs differ
        first = next(iter(labels))
        click.echo(f"paired differences from {first} on the same episodes (95% CI of the per-episode differences):")
        click.echo("| run | " + " | ".join(paired) + " |")
        click.echo("| --- |" + " ---: |" * len(paired))
        for label in list(labels)[1:]:
            cells = [f"{d['mean']:+.4g} +/- {d['ci95']:#.2g}" if (d := result[label][m].get("difference")) else ""
                     for m in paired]
            # a difference from (or of) a coverage that is 0 by definition measures nothing
            cells = [cell if not (m.startswith("coverage_") and (one_model(result, label) or one_model(result, first)))
                     else "n/a" for cell, m in zip(cells, paired)]
            click.echo(f"| {label} | " + " | ".join(cells) + " |")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=GivenPath(RUN))
@click.option("--group-by", default=None, metavar="OPTION,...",
              help="the options that make a setting (default: every option the runs differ in but the seed)")
@click.option("--evaluation", default="eval", show_default=True, metavar="NAME",
              help="the evaluation file each run is scored by, without .json (e.g. eval-ensemble=5)")
@click.option("--json", "json_path", type=GivenPath(FILE, None), default=None,
              help="also write the summary here (-: print it as JSON instead of the table)")
def summarize(run_dirs, group_by, evaluation, json_path):
    """Results over seeds: the runs grouped by setting, each group's mean score with its 95%
    interval over the seeds (Student's t), SD and range, from each run's eval.json."""
    from metalearn.aggregate import format_summary, summarize_runs

    if json_path not in (None, "-"):
        from metalearn.prediction import refuse_run_files

        check_writable_file("--json", json_path, "summary.json")
        refuse_run_files([(("json", "--json"), json_path)])  # a run's own file (its eval.json) is not replaced
    groups = [name.strip() for name in group_by.split(",") if name.strip()] if group_by is not None else None
    if groups == []:  # `--group-by ""` or `,,`: given, but naming nothing, it would read as no grouping
        raise MetalearnError(f"--group-by {group_by!r} names no option; give the options that make a setting "
                             "(e.g. inner_lr,train.meta_lr), or leave it out to group by every option the runs "
                             "differ in")
    summary = summarize_runs(list(run_dirs), group_by=groups, evaluation=evaluation)
    text = json.dumps(json_finite(summary), indent=2, allow_nan=False)
    if json_path == "-":
        click.echo(text)
        return
    click.echo(format_summary(summary))
    if json_path is not None:
        from metalearn.files import atomic_write_bytes

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(json_path), (text + "\n").encode())
        click.echo(f"written to {json_path}")


@cli.command()
@click.argument("run_dir", type=GivenPath(RUN))
@click.option("--support", type=GivenPath(IMAGES, None), required=True,
              help="a folder with one sub-folder per new class, each holding 1 or more example images")
@click.option("--query", "queries", type=GivenPath(IMAGES, None), required=True, multiple=True,
              help="a folder of images to classify, or an image file (repeat for several)")
@click.option("--json", "json_path", type=GivenPath(FILE, None), default=None,
              help="also write the predictions here as JSON (-: print them as JSON instead of the list)")
@click.option("--csv", "csv_path", type=GivenPath(FILE, None), default=None,
              help="also write the predictions here as CSV (-: print them as CSV instead of the list)")
@click.option("--sheet", type=GivenPath(FILE, None), default=None,
              help="draw a contact sheet here (PNG): the support images by class, then each query with its prediction")
@click.option("--samples", "num_samples", type=click.IntRange(min=1), default=None,
              help="models sampled per task (PLATIPUS; default the run's --num-samples)")
@click.option("--device", default="cpu", show_default=True, help=ONE_PROCESS_DEVICE_HELP)
def predict(run_dir, support, queries, json_path, csv_path, sheet, num_samples, device):
    """Classify new images among new classes from a few labelled examples of each, with a trained
    run: metalearn predict RUN_DIR --support DIR --query DIR_OR_FILE."""
    from metalearn.api import predict_run
    from metalearn.prediction import as_csv, as_json

    printed = [(option, form) for option, path, form in (("--json", json_path, as_json), ("--csv", csv_path, as_csv))
               if path == "-"]  # the predictions alone on the output, for a script
    if len(printed) > 1:
        raise MetalearnError("--json - and --csv - both print to the output; give one of them a file")
    if sheet == "-":
        raise MetalearnError("--sheet - : a contact sheet is a PNG file; give its path")
    json_path, csv_path = (None if path == "-" else path for path in (json_path, csv_path))
    # predict_run checks the output paths before it reads an image
    result = predict_run(run_dir, support, list(queries), json_out=json_path, csv_out=csv_path, sheet=sheet,
                         num_samples=num_samples, device=device)
    if printed:
        click.echo(printed[0][1](result).decode("utf-8", "surrogateescape"), nl=False)
        for path in (json_path, csv_path, sheet):
            if path is not None:
                click.echo(f"wrote {path}", err=True)
        return
    shots = ", ".join(f"{name} ({n})" for name, n in zip(result["classes"], result["shots"]))
    click.echo(f"{result['method']} (step {result['step']}), classes: {shots}")
    for p in result["predictions"]:
        spread = f" +/- {p['spread']:.3f}" if "spread" in p else ""
        click.echo(f"{p['file']}\t{p['label']}\t{p['probability']:.3f}{spread}")
    if "accuracy" in result:
        labelled = sum("true" in p for p in result["predictions"])
        click.echo(f"accuracy on the {labelled} quer{'y' if labelled == 1 else 'ies'} in folders named like a class: "
                   f"{100 * result['accuracy']:.1f}%")
    for path in (json_path, csv_path, sheet):
        if path is not None:
            click.echo(f"wrote {path}")


@cli.command("sample")
@click.argument("run_dir", type=GivenPath(RUN))
@click.option("--support", multiple=True, required=True, type=GivenPath(IMAGES),
              help="drawings of one character: image files or a folder of them (repeatable)")
# the range is sample_run's to check: one wording for a number too small or too large
@click.option("--num", type=int, default=20, show_default=True, help=f"new images to draw (1 to {MAX_SAMPLES})")
@click.option("--out", type=GivenPath(FILE, None), default=None,
              help="the PNG grid to write (default RUN_DIR/plots/samples.png)")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True, help="seed of the noise")
def sample_command(run_dir, support, num, out, seed):
    """Draw new images of the character shown by --support with a generative run (statistician):
    a PNG grid, the inputs in the first row and the samples beneath."""
    from metalearn.api import sample_run

    click.echo(f"wrote {sample_run(run_dir, list(support), num=num, out=out, seed=seed)}")


@cli.command("export")
@click.argument("run_dir", type=GivenPath(RUN))
@click.argument("out_dir", type=GivenPath(FOLDER))
@click.option("--data-dir", type=GivenPath(FOLDER), default=None, help=PLOT_DATA_DIR_HELP)
@click.option("--compare", "compare_with", type=GivenPath(RUN), default=None,
              help="another run drawn beside this one: PLATIPUS's samples or maml-rl's returns (see plot)")
def export_command(run_dir, out_dir, data_dir, compare_with):
    """Write a run's summary.json and plots to OUT_DIR (e.g. results/<name>) for committing."""
    from metalearn.api import export_results

    notes: list[str] = []
    for path in export_results(run_dir, out_dir, data_dir=data_dir, compare_with=compare_with, notes=notes):
        click.echo(f"wrote {path}")
    for note in notes:
        click.echo(f"note: {note}", err=True)


def _listed(path: Path) -> bool:
    """Whether ``status`` lists ``path`` of the runs folder: a run's folder, or one it cannot read
    (listed with its error, as a damaged run is, rather than ending the listing)."""
    try:
        return RunDir(path).exists()
    except OSError:  # a folder that refuses to be read (chmod 000): its config.json cannot be looked for
        with contextlib.suppress(OSError):
            return path.is_dir()
        return False


@cli.command("status")
@click.argument("run_dirs", nargs=-1, type=GivenPath(RUN))
@click.option("--json", "as_json", is_flag=True, help="print a JSON list, one object per run")
def status_command(run_dirs, as_json):
    """Where runs stand: step, training time, whether a process trains them now, the last
    metrics, validation and evaluations. Without RUN_DIRS: every run in $METALEARN_RUNS (else
    runs/ in the cache folder). Reads only: writes nothing and holds no lock (it tries a run's lock for an instant, to see
    whether a process holds it)."""
    from metalearn.api import run_status
    from metalearn.runs import default_runs_root, no_runs_in

    listing = not run_dirs
    if listing:
        root = default_runs_root()
        run_dirs = sorted(path for path in root.iterdir() if _listed(path)) if root.is_dir() else []
        if not run_dirs:
            click.echo("[]" if as_json else no_runs_in(root))  # --json: always JSON, for a script to read
            if as_json:
                click.echo(no_runs_in(root), err=True)
            return
    statuses, failed = [], []
    for run_dir in run_dirs:
        try:
            statuses.append(run_status(run_dir))
        except Exception as err:  # noqa: BLE001 -- in a listing, whatever a damaged folder raises
            if not listing:
                if not isinstance(err, (MetalearnError, OSError)):
                    raise
                # a folder the user named: an error line, exit 2, and the other named runs still shown
                failed.append(describe_os_error(err) if isinstance(err, OSError) else spellings(err)[1])
                continue
            # one damaged or unreadable run hides no others; its error as the command line spells options
            said = describe_os_error(err) if isinstance(err, OSError) else spellings(err)[1]
            statuses.append({"run": str(run_dir), "error": said or type(err).__name__})
    if as_json:  # also [] when every named folder failed (each said on stderr)
        # standard JSON, which every reader parses: a number that is not finite (a diverged loss,
        # a damaged record) as null, not Python's NaN or Infinity
        click.echo(json.dumps(json_finite(statuses), indent=2, allow_nan=False))
    else:
        shown = []
        for status in statuses:
            try:  # a record that cannot be shown is that run's one error line; the others are still shown
                shown.append(format_status(status))
            except Exception as err:  # noqa: BLE001 -- whatever a damaged record's values raise
                reason = f"a record holds a value that cannot be shown ({err or type(err).__name__})"
                if listing:
                    shown.append(f"{status['run']}: error: {reason}")
                else:  # a folder the user named: an error line and exit 2, as a folder that is no run
                    failed.append(f"{status['run']}: {reason}")
        if shown:
            click.echo("\n".join(shown))
    for message in failed:
        click.echo(f"error: {message}", err=True)
    if failed:
        sys.exit(2)




def format_duration(seconds: float) -> str:
    """``"8 h 52 min"``, ``"3 min 12 s"``, ``"40 s"``: hours and minutes from an hour on, else
    minutes and seconds (a short remainder never reads "0 h 0 min"); ``"?"`` for a time that is
    no length of time (not finite, or negative: a damaged record, a clock set back)."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        return "?"
    hours, rest = divmod(int(seconds), 3600)
    if hours:
        return f"{hours} h {rest // 60} min"
    return f"{rest // 60} min {rest % 60} s" if rest >= 60 else f"{rest} s"


def format_machine(record: dict) -> str:
    """One of a run's ``machines`` records as a few words: "AMD EPYC 7B13 (AVX512, 2 cores, 1
    torch thread) from step 0", with the GPU and the number of processes where there were such."""
    threads = record.get("torch_threads")
    parts = [record.get("cpu_capability"), f"{record.get('cores') or '?'} cores",
             f"{threads} torch thread{'' if threads == 1 else 's'}" if threads is not None else None]
    if isinstance(record.get("processes"), int) and record["processes"] > 1:
        parts.append(f"{record['processes']} processes")
    device = f", {record['device']}" if record.get("device") else ""
    return (f"{record.get('processor', '?')}{device} ({', '.join(p for p in parts if p)}) "
            f"from step {record.get('from_step', '?')}")


def format_status(status: dict) -> str:
    """:func:`~metalearn.api.run_status` as a few lines of text."""
    if "error" in status:
        return f"{status['run']}: error: {status['error']}"
    lines = [f"{status['run']}: {status['method']} on {status['task']}"]
    steps = max(status["steps"], 1)
    state, holder = status["state"], status["holder"]
    own = status.get("own") or []  # trained from Python on what config.json does not describe
    mine = {"network": "a network of your own", "tasks": "tasks of your own"}
    python = (f"trained with {' and '.join(mine.get(part, part) for part in own)}, which config.json does not "
              "describe: in Python, ") if own else ""
    if state == "training":
        doing = f"training now (process {holder['pid']}, since {holder.get('since', '?')})"
    elif state == "testing":
        doing = f"complete; being tested now by the process that trained it (process {holder['pid']})"
    elif state == "training elsewhere":
        doing = f"training on {holder.get('host', '?')} (process {holder['pid']}, since {holder.get('since', '?')})"
    elif state == "stopped":
        doing = f"stopped; {python or 'continue with '}`{status['resume']}`"
    elif state == "diverged":
        step, what = status["diverged"]["step"], status["diverged"]["what"]
        if (fix := data_fix(what)) is not None:  # the data's, not the learning rates'
            advice = fix
        elif step == 1:  # nothing trained: the folder takes a new run as it is
            advice = "train again into this folder with other options (a smaller learning rate)"
        else:
            advice = ("train anew in another --run-dir with other options (a smaller learning rate), or "
                      "--init-from this run to keep its last good weights")
        doing = f"diverged at step {step} ({what}), which a resume repeats: {advice}"
    elif state == "no checkpoint":
        doing = "no checkpoint.pt, so it cannot be resumed; start afresh in another --run-dir"
    elif state == "unknown":
        doing = (f"unknown from here: the lock names {holder.get('host', '?')} (process {holder['pid']}, since "
                 f"{holder.get('since', '?')}), but it is free as seen from this machine: a killed holder, or a "
                 f"file system that does not lock between machines")
    elif state == "complete" and "eval" not in status["evaluations"]:
        doing = f"complete; not tested yet: {python}`{status['test']}`"
    else:
        doing = state
    last = status["last"]
    # run_status's step, as --json gives it: a live or killed run logs steps after its last checkpoint
    at, checkpoint = status["step"], status["checkpoint_step"]
    saved = f", checkpoint at {checkpoint}" if at != checkpoint else ""
    spent = format_duration(status["training_time_s"])  # to the step shown
    lines.append(f"  step {at} of {status['steps']} ({100 * at // steps}%{saved}), {spent} of training; {doing}")
    if status["last_write_s"] is not None:
        ago = status["last_write_s"]
        lines[-1] += f"; metrics written {int(ago // 60)} min ago" if ago >= 60 else f"; metrics written {int(ago)} s ago"
    machines = [m for m in status.get("machines") or () if isinstance(m, dict)]
    if machines:
        lines.append("  trained on: " + "; ".join(format_machine(m) for m in machines))
    def shown(name: str, value) -> str:  # a training record's accuracies are fractions: in percent, as the scores below
        if name.endswith("accuracy") and not name.startswith("val_") and isinstance(value, (int, float)):
            return f"{100 * value:.2f}%"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    if last is not None:
        values = ", ".join(f"{k} {shown(k, v)}" for k, v in last.items() if k not in ("step", "elapsed_s"))
        lines.append(f"  last logged (step {last['step']}): {values}")
    if status["seconds_left"] is not None and state != "complete":
        counted = ("" if not status["validates"] else
                   " (validation included)" if status["validation_counted"] else " (validation not counted)")
        start = status["steps"] - status["steps_left"]  # a stopped run resumes from its checkpoint
        origin = f" from step {start}, the checkpoint's" if start != at else ""
        lines.append(f"  the remaining {status['steps_left']} steps{origin}: about "
                     f"{format_duration(status['seconds_left'])} at the recent rate{counted}")
        for step, what in status["cost_changes"]:
            lines.append(f"  not in that estimate: after step {step}, {what}")
    latest, best = status["validation"]["latest"], status["validation"]["best"]
    if latest is not None:
        name = next(k for k, v in latest.items() if k.startswith("val_") and k != "val_ci95"
                    and isinstance(v, (int, float)))
        digits = 4 if name == "val_mse" else 2
        text = f"  validation {name[len('val_'):]}: {latest[name]:.{digits}f} at step {latest['step']}"
        if best is not None and best is not latest:
            text += f" (best {best[name]:.{digits}f} at step {best['step']})"
        lines.append(text)
    for stem, result in status["evaluations"].items():
        if isinstance(result.get("mean"), (int, float)) and isinstance(result.get("ci95"), (int, float)):
            unit = "episodes" if result.get("metric") == "accuracy" else "tasks"  # as `metalearn eval` says
            step = f", step {result['step']}" if result.get("step") is not None else ""
            if result.get("outdated") and "ensemble" in result:  # evaluate again
                step += ", other checkpoints than the run's best now"
            elif result.get("outdated"):
                step += f", an earlier checkpoint than the run's of step {checkpoint}"
            digits = 4 if result.get("metric") == "mse" else 2
            lines.append(f"  {stem}: {result['metric']} {result['mean']:.{digits}f} +/- {result['ci95']:.{digits}f} "
                         f"({result.get('episodes')} {unit}{step})")
    return "\n".join(lines)


# -- data -------------------------------------------------------------------------------------


@cli.group()
def data():
    """Omniglot: prepare the cached array, show split sizes, verify integrity."""


@data.command()
@click.option("--data-dir", type=GivenPath(FOLDER), default=None, help=OMNIGLOT_DIR)
@click.option("--image-size", type=INTEGER, default=28, show_default=True)
@click.option("--download", is_flag=True, help="fetch the official archives first (checksums verified)")
def prepare(data_dir, image_size, download):
    """Build the cached preprocessed array (once; later loads take well under a second)."""
    from metalearn.data.omniglot import default_data_dir, load_omniglot

    data_dir = data_dir or default_data_dir()
    if download:
        from metalearn.data.download import download_omniglot

        for name, path in download_omniglot(data_dir, progress=show_progress(None)).items():
            click.echo(f"{name}: {path}")
    start = time.perf_counter()
    omniglot = load_omniglot(data_dir, image_size, progress=show_progress(None))
    click.echo(f"{omniglot.images.shape[0]} characters x {omniglot.images.shape[1]} drawings at "
               f"{image_size}x{image_size} ready in {time.perf_counter() - start:.1f}s "
               f"(content hash {omniglot.content_hash[:16]})")


@data.command()
@click.option("--data-dir", type=GivenPath(FOLDER), default=None, help=OMNIGLOT_DIR)
@click.option("--image-size", type=INTEGER, default=28, show_default=True)
def info(data_dir, image_size):
    """Characters and classes in every part of every split."""
    from metalearn.data.omniglot import load_omniglot
    from metalearn.data.splits import PARTS, SPLITS, has_part, omniglot_split

    omniglot = load_omniglot(data_dir, image_size, progress=show_progress(None))
    click.echo(f"omniglot: {len(omniglot.names)} characters, {omniglot.images.shape[0] * omniglot.images.shape[1]} "
               f"images, {int(omniglot.background.sum())} background / {int((~omniglot.background).sum())} evaluation")
    click.echo(f"{'split':16s} {'part':6s} {'characters':>10s} {'classes':>8s}  rotations")
    for split in SPLITS:
        for part in PARTS:
            if not has_part(split, part):
                continue
            pool = omniglot_split(omniglot, split, part)
            rotations = "random per task" if bool((pool.rotations < 0).any()) else (
                "0/90/180/270 as classes" if bool((pool.rotations > 0).any()) else "none")
            click.echo(f"{split:16s} {part:6s} {pool.num_characters:10d} {len(pool):8d}  {rotations}")


@data.command()
@click.option("--data-dir", type=GivenPath(FOLDER), default=None, help=OMNIGLOT_DIR)
def verify(data_dir):
    """Check each archive's PNG content against the official content digest."""
    from metalearn.data.omniglot import verify_release

    results = verify_release(data_dir)
    for archive, ok in results.items():
        click.echo(f"{archive}: {'ok' if ok else 'MISMATCH'}")
    if not all(results.values()):
        raise MetalearnError("the data does not match the official release; download it again")


def _flag_value(argv: list[str], flag_name: str) -> str | None:
    """The value a command line gives ``flag_name`` (the last of ``--flag value`` and
    ``--flag=value``, as the last one given counts), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(flag_name + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag_name and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _has_checkpoint(argv: list[str]) -> bool:
    """Whether the ``--run-dir`` of a train command line holds a checkpoint now, so that a
    message may say the run can continue from it (not for ``--print-config``, which writes
    nothing, nor for a run that ran out of memory before its first checkpoint)."""
    folder = _flag_value(argv, "--run-dir")
    return "--print-config" not in argv and folder is not None and RunDir(folder).has_checkpoint()


# options that set how much a command holds in memory at once, in the order the advice names
# them, each group with the words that turn it down. The advice names those that the command
# which ran out has, and that its dataset and method take (see memory_advice). A method's own
# options join the last group of their words where they say so (``option(..., memory="fewer")``)
MEMORY_OPTIONS = (
    ("a smaller", ("meta_batch_size",)),
    ("fewer", ("ways", "shots", "query", "num_samples", "num")),  # num_samples: predict's and compare's --samples
    ("a shorter", ()),
    ("a smaller", ("image_size",)),
)


def memory_groups(method: str | None) -> list[tuple[str, list[str]]]:
    """:data:`MEMORY_OPTIONS` with ``method``'s options that declare the words that turn them
    down (``memory``), each in the last group of its words."""
    import dataclasses

    from metalearn.algorithms import method_class

    groups = [(words, list(names)) for words, names in MEMORY_OPTIONS]
    for field in dataclasses.fields(method_class(method).Config) if method in METHODS else ():
        words = field.metadata.get("memory")
        if words and field.name not in {name for _, names in groups for name in names}:
            next(names for said, names in reversed(groups) if said == words).append(field.name)
    return groups


def _parsed_command(argv: list[str]) -> tuple[list[str], click.Command | None, dict]:
    """The names of the command that ``argv`` runs (``["train", "maml"]``), the command and its
    options as parsed, none checked (click's resilient parsing: a bad value reads as None)."""
    command, names, rest = cli, [], list(argv)
    while isinstance(command, click.Group):
        ctx = click.Context(command)
        # the first word that names a subcommand: the others are values of the group's options
        i = next((i for i, word in enumerate(rest) if not word.startswith("-") and command.get_command(ctx, word)),
                 None)
        if i is None:
            return names, None, {}
        names.append(rest[i])
        command, rest = command.get_command(ctx, rest[i]), rest[i + 1:]
    try:
        with command.make_context(" ".join(names), rest, resilient_parsing=True) as ctx:
            return names, command, dict(ctx.params)
    except Exception:  # noqa: BLE001 -- advice only: a command line it cannot read gets the general one
        return names, command, {}


def _runs_of(names: list[str], params: dict) -> tuple[list[str], list[str]]:
    """The datasets and methods of the runs a command line works on, as far as they can be known
    without running it: train's --dataset (or the resumed run's, or the method's default), the
    saved config.json of the RUN_DIRs of the other commands."""
    try:
        if names[0] == "train":
            method = names[1]
            if params.get("resume") and params.get("run_dir") is not None:
                return [RunDir(params["run_dir"]).read_config().task.dataset], [method]
            return [params.get("dataset") or METHODS[method].default_dataset or TaskConfig.dataset], [method]
        folders = [*(params.get("run_dirs") or ()), *([params["run_dir"]] if params.get("run_dir") else [])]
        configs = [RunDir(folder).read_config() for folder in folders]
        return [c.task.dataset for c in configs], [c.method for c in configs]
    except Exception:  # noqa: BLE001 -- advice only: a run that cannot be read leaves its options in
        return [], []


def samples_models(method: str) -> bool:
    """Whether ``method`` samples models (PLATIPUS), which ``--samples`` sets the number of."""
    from metalearn.algorithms import can

    return can(method, "samples models")


def memory_option_groups(argv: list[str]) -> list[str]:
    """The options of :data:`MEMORY_OPTIONS` that the command of ``argv`` has (train: of its
    method) and that its dataset and method take, each group in its words (``"fewer --ways,
    --shots or --query"``), so that no advice names an option the command would refuse."""
    from metalearn.algorithms import method_class
    from metalearn.datasets import get_dataset

    names, command, params = _parsed_command(argv)
    has = {p.name: p.opts[0] for p in (command.params if command is not None else ()) if isinstance(p, click.Option)}
    left_out: set[str] = set()
    if names:
        datasets, methods = _runs_of(names, params)
        for name in datasets:  # ways of a regression task, the image size of generated tasks, ...
            try:
                left_out.update(get_dataset(name).inapplicable)
            except MetalearnError:
                pass
        if methods and names[0] != "train" and all(method_class(m).fixed_ways for m in methods if m in METHODS):
            left_out.add("ways")  # eval --ways is for methods without a per-class output layer
        if methods and not any(samples_models(m) for m in methods if m in METHODS):
            left_out.add("num_samples")  # refused for a method that does not sample
    groups = []
    for words, group in memory_groups(names[1] if names[:1] == ["train"] and len(names) > 1 else None):
        flags = [has[name] for name in group if name in has and name not in left_out]
        if flags:
            listed = f"{', '.join(flags[:-1])} or {flags[-1]}" if len(flags) > 1 else flags[0]
            groups.append(f"{words} {listed}")
    return groups


def memory_advice(argv: list[str]) -> str:
    """What to change after running out of memory: the options of :data:`MEMORY_OPTIONS` that the
    command of ``argv`` has (train: of its method) and that its dataset and method take, so that
    no advice names an option the command would refuse; for train, --resume where the run folder
    holds a checkpoint to continue from."""
    names, command, params = _parsed_command(argv)
    groups = memory_option_groups(argv)
    advice = f"Ask for less at once: {', '.join(groups)}" if groups else "Use a machine with more memory"
    if names[:1] != ["train"] or len(names) < 2 or names[1] not in METHODS:
        return advice + "."
    from metalearn.algorithms import method_class
    from metalearn.algorithms.base import MetaLearner

    # --task-chunk gives the same meta-gradient in less memory and is the one of these options a
    # resumed run may change (config.RESUMABLE_CHANGES); named for methods that never refuse it
    has = {p.name for p in (command.params if command is not None else ())}
    chunks = method_class(names[1]).chunking_refused is MetaLearner.chunking_refused and "task_chunk" in has
    less = ", ".join(groups)
    chunk = "--task-chunk auto (or a smaller --task-chunk): the same meta-gradient in less memory"
    given = str(params.get("task_chunk"))
    if given == "auto":  # auto measured a step and still ran out (a peak its probe missed): one at a time
        chunk = "--task-chunk 1, one task at a time: the same meta-gradient in the least memory"
    elif given == "1":  # nothing smaller to give
        chunks = False
    if _has_checkpoint(argv):
        fresh = f"ask for less at once in a new --run-dir (--init-from this run keeps its weights): {less}"
        if chunks:
            return f"Continue with --resume {chunk}, from the run's last checkpoint. Or {fresh}."
        return f"The other options cannot change on a --resume: {fresh}."
    return f"Give {chunk}. Or {advice[0].lower()}{advice[1:]}." if chunks else advice + "."


def out_of_memory_in(err: BaseException) -> BaseException | None:
    """The allocation failure that ``err`` is or arose from (torch reports CPU and GPU ones as
    RuntimeError subclasses with these words), or None. An import that runs out of memory ends
    as an ImportError or a SystemError whose cause or context is the MemoryError: the chain is
    followed through those two alone, a few links deep (another error raised while handling an
    out-of-memory one is a bug of its own, with its traceback)."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return None
        text = str(seen) if isinstance(seen, RuntimeError) else ""
        if isinstance(seen, MemoryError) or "out of memory" in text or "can't allocate memory" in text:
            return seen
        if not isinstance(seen, (ImportError, SystemError)):
            return None
        seen = seen.__cause__ or seen.__context__
    return None


def open_files_advice() -> str:
    """What to do when the process may open no more files: its limit, where it is known, and
    the command that raises it."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # not Unix
        return "allow this process more open files"
    if soft != resource.RLIM_INFINITY and soft < 4096 and (hard == resource.RLIM_INFINITY or hard >= 4096):
        return f"this process may have {soft} files open at once; raise it with `ulimit -n 4096`"
    return "the system's or this process's limit on open files is reached; close other programs or raise it"


def describe_os_error(err: OSError) -> str:
    """One line for a path that cannot be used; "File exists" from making a folder where a
    file is says which it is."""
    if err.errno in (errno.EMFILE, errno.ENFILE):  # the limit on open files, not the path, is at fault
        where = f"{err.filename}: " if err.filename is not None else ""
        return f"{where}{err.strerror or err}: {open_files_advice()}"
    if err.filename is None:
        return str(err.strerror or err)
    path = Path(err.filename)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):  # the file and the space left, as every write failure
        from metalearn.files import WriteError

        return str(WriteError(path, err))
    if err.errno == errno.EEXIST and path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder; give a folder path"
    if err.errno == errno.ENOTDIR:  # a file where the path needs a folder
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"{path}: {blocking} is a file, not a folder"
    return f"{path}: {err.strerror or err}"


def show_warning(message, category, filename, lineno, file=None, line=None, _plain=warnings.showwarning) -> None:
    """A :class:`MetalearnWarning` as one ``warning:`` line (rank 0's alone under torchrun);
    other warnings as Python shows them."""
    if not issubclass(category, MetalearnWarning):
        return _plain(message, category, filename, lineno, file, line)
    if reports():
        click.echo(f"warning: {message.with_flags() if isinstance(message, Options) else message}", err=True)


# whether this process runs one command and nothing else (the ``metalearn`` command, ``python -m
# metalearn``): then --time-limit counts from the process's start, its imports included
_WHOLE_PROCESS = False


class ReaderMayLeave(DroppingStream):
    """A standard stream whose reader may go away (``metalearn train ... | head -1``) or whose
    file cannot take more (a full disk, a file-size limit, ``> /dev/full``): from the first
    write that fails on, the output is dropped instead of raised (:class:`DroppingStream`), so
    that the command finishes its work (a training run trains, saves and tests) rather than
    stopping at a print or at its progress bar. A closed pipe leaves the exit status the work's;
    another failure is kept as :attr:`write_error`, which :func:`main` reports at the end (the
    standard output's: exit 2, as the output is lost). As Python's "Note on SIGPIPE" advises,
    the stream's file descriptor is then pointed at os.devnull, so that the flush at exit does
    not fail a second time with a message of its own (after another failure only in a process
    of its own: main(whole_process=True))."""

    def _drop(self, err: OSError) -> None:
        super()._drop(err)
        if self.write_error is not None and not _WHOLE_PROCESS:
            return  # a caller's own process (a test, a notebook) keeps its stream as it is
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # no file descriptor (a stream in memory): nothing is flushed to it at exit


_STOP_SIGNAL_RECEIVED = 0  # the number of the stop signal this command's handler received, 0 for none


def _terminated(signum, frame) -> None:
    # recorded as well as raised: code that turns the exception into another (matplotlib's C++
    # drawing, called back into Python, makes it a ValueError) still ends as that signal (_main)
    global _STOP_SIGNAL_RECEIVED
    _STOP_SIGNAL_RECEIVED = int(signum)
    raise Terminated(signum)


def main(args: list[str] | None = None, whole_process: bool = False) -> None:
    """Entry point: user errors print one line and exit 2, never a traceback. ``whole_process``:
    the process was started for this command (a time limit then counts from its start; a
    SIGTERM ends it as a Ctrl-C does, cleaning up, with exit 143, and so do SIGUSR1 and SIGUSR2
    with theirs). A
    reader that closes the output early (``| head -1``) stops nothing: see :class:`ReaderMayLeave`."""
    global _WHOLE_PROCESS
    _WHOLE_PROCESS = whole_process
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (ReaderMayLeave(s) if s is not None else None for s in streams)
    import signal
    import threading

    handled = whole_process and threading.current_thread() is threading.main_thread()
    global _STOP_SIGNAL_RECEIVED
    _STOP_SIGNAL_RECEIVED = 0  # this command's, not an earlier one's in the same process
    if handled:
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, _terminated)
    failed = True  # whether the command ends with an error of its own
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            _main(args)
        failed = False
    except SystemExit as ended:
        failed = ended.code not in (0, None)
        raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, ReaderMayLeave):
                # what print() left buffered: a closed pipe is met here, not at exit; any other
                # failure of the flush (a stream closed by the caller) must not replace the exit status
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
        lost = getattr(sys.stdout, "write_error", None)
        sys.stdout, sys.stderr = streams
        if handled:
            # the command's work is done, its status set: a SIGTERM in the second the interpreter
            # takes to shut down would end it with 143 and no word, and a scheduler would run the
            # finished job again
            for stop_signal in STOP_SIGNALS:
                signal.signal(stop_signal, signal.SIG_IGN)
        if lost is not None and not failed:
            # the work is done (its files written) but what it printed is not all there: a
            # script reading the output must not take it for whole
            with contextlib.suppress(OSError, ValueError):
                print(f"error: could not write the standard output ({lost.strerror or lost}); the command's "
                      "work is done, what it printed is incomplete", file=sys.stderr)
            sys.exit(2)


def _exit_if_terminated() -> None:
    """End with the stop signal's status where this command's handler recorded one: the error
    being handled is the Terminated a library turned into its own (see :func:`_terminated`)."""
    if _WHOLE_PROCESS and _STOP_SIGNAL_RECEIVED:
        said, code = stopped_by(Terminated(_STOP_SIGNAL_RECEIVED))
        click.echo(said, err=True)
        sys.exit(code)


def _main(args: list[str] | None) -> None:
    try:
        load_plugins()  # before the arguments are read: a plugin's methods are commands, its names values
        code = cli.main(args=args, prog_name="metalearn", standalone_mode=False)
        leave_world(orderly=True)
    except (TrainingStopped, TrainingInterrupted) as err:  # --time-limit or --stop-at, Ctrl-C or SIGTERM: saved
        if err.exit_code == 0:  # --stop-at: a success, every rank paused after the same step
            leave_world(orderly=True)
        click.echo(err.with_flags(), err=True)  # an option it names (--stop-at) as the command line spells it
        sys.exit(err.exit_code)
    except (ConfigError, OptionError) as err:  # the field or option named as the command line spells it
        click.echo(f"error: {err.with_flags()}", err=True)
        sys.exit(2)
    except MetalearnError as err:  # one that names options (Options: a run folder in use) spells them as flags
        click.echo(f"error: {err.with_flags() if isinstance(err, Options) else err}", err=True)
        sys.exit(2)
    except OSError as err:  # a path that is a file, a folder, unwritable or gone
        click.echo(f"error: {describe_os_error(err)}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt, EOFError) as err:  # click makes a KeyboardInterrupt Abort
        ended = err if isinstance(err, EOFError) else err.__cause__
        if isinstance(ended, EOFError):  # and an EOFError too: a file that ended early, not Ctrl-C
            click.echo(f"error: a file ended before its end (EOFError: {ended})", err=True)
            sys.exit(2)
        click.echo("interrupted", err=True)  # train says how to go on itself (TrainingInterrupted)
        sys.exit(130)
    except Terminated as err:
        said, code = stopped_by(err)
        click.echo(said, err=True)
        sys.exit(code)
    except NoArgsIsHelpError as err:  # `metalearn`, `metalearn train`: the help, not an "error: Usage: ..."
        click.echo(err.format_message(), err=True)
        sys.exit(err.exit_code)
    except click.UsageError as err:  # one line, as every other mistake, not click's three
        message = err.format_message()
        where = f" (see {err.ctx.command_path} --help)" if err.ctx is not None else ""
        if isinstance(err, click.NoSuchOption) and err.ctx is not None and err.ctx.command is train:
            # `metalearn train --ways 5 maml`: the options follow the method
            message = f"{message.rstrip('.')}: the options come after the method, metalearn train METHOD [OPTIONS]."
        click.echo(f"error: {message}{where}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except Exception as err:
        memory = out_of_memory_in(err)
        if memory is None and size_overflow_in(err) is not None:  # 2**63 - 1 tasks or units: torch's size arithmetic
            argv = sys.argv[1:] if args is None else [str(a) for a in args]
            try:
                groups = memory_option_groups(argv)
            except Exception:  # noqa: BLE001 -- advice only: a command line it cannot read gets none
                groups = []
            smaller = f" ({', '.join(groups)})" if groups else ""
            click.echo(f"error: the sizes asked for are too large to compute with ({first_line(err)}): give smaller "
                       f"ones{smaller}", err=True)
            sys.exit(2)
        if memory is None:
            _exit_if_terminated()
            raise
        detail = (str(memory).splitlines() or [type(memory).__name__])[0][:160] or type(memory).__name__
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        try:
            advice = memory_advice(argv)
        except Exception:  # noqa: BLE001 -- reading the command again needs memory too
            advice = "Ask for less at once, or use a machine with more memory."
        click.echo(f"error: out of memory ({detail}). {advice}", err=True)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
