"""The ``metalearn`` command. Thin: parses options, calls the Python API, prints."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource
from click.exceptions import NoArgsIsHelpError

from metalearn.algorithms import ALGORITHMS
from metalearn.config import MAX_SEED, TaskConfig, TrainConfig
from metalearn.distributed import leave_world
from metalearn.errors import MetalearnError, TrainingStopped
from metalearn.options import help_of
from metalearn.runs import RunDir
from metalearn.runtime import tune_allocator

DEVICE_HELP = ("cpu, cuda (under torchrun: each rank's GPU, NCCL), cuda:N or auto; not part of the run, "
               "which resumes or evaluates on any device")
CACHE_HELP = "the cache folder: $METALEARN_CACHE, else $XDG_CACHE_HOME/metalearn, else ~/.cache/metalearn"
DATA_DIR_HELP = ("folder with images_background.zip / images_evaluation.zip (default: $METALEARN_DATA, else "
                 f"omniglot/ in {CACHE_HELP})")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="metalearn")
def cli():
    """metalearn: meta-learning (MAML and its peers), batched over tasks with torch.func."""
    tune_allocator()


# -- option generation from the config dataclasses ------------------------------------------


# what an option means, its values and its default, where the type and the field's default do not say
OPTION_HELP = {
    "dataset": "omniglot, sinusoid or sine-or-line (default omniglot)",
    "split": "omniglot's class split: maml, vinyals or lake (default maml)",
    "ways": "classes per task (default 5; omniglot only)",
    "shots": "support examples per class, or support points K for regression (default 1; 5 for regression)",
    "query": "query examples per class, or query points for regression (default: as many as --shots)",
    "test_ways": "classes per test and validation task (default: --ways)",
    "test_shots": "support examples per class in test and validation tasks (default: --shots)",
    "test_query": "query examples per class in test and validation tasks (default: --query; 100 points for regression)",
    "image_size": "omniglot images are resized to this many pixels square (default 28)",
    "noise_std": "standard deviation of the noise on regression targets (default 0 for sinusoid, 0.3 for sine-or-line)",
    "init_from": "a trained run directory whose network gives the initial weights (default none)",
    # training: defaults follow the paper for the task (--print-config)
    "steps": "meta-updates to train for",
    "meta_batch_size": "tasks per meta-update",
    "meta_lr": "the meta-optimiser's learning rate (MAML's beta)",
    "meta_optimizer": "the meta-optimiser: adam or sgd",
    "lr_halve_every": "halve the meta learning rate every this many steps (0: never)",
    "lr_anneal": "none, or linear: the meta learning rate falls linearly to 0 over --steps (Reptile)",
    "seed": "seeds the initial weights and every task drawn; the same seed repeats a run exactly on the same "
            "machine and versions",
    "log_every": "steps between lines of metrics.jsonl",
    "val_every": "steps between validations on the validation split (0: none)",
    "val_episodes": "episodes per validation",
    "checkpoint_every": "steps between checkpoints (one is also written at the end and on Ctrl-C)",
    "eval_episodes": "test episodes of the evaluation after training",
    # the gradient-based methods
    "inner_lr": "step size of the inner-loop gradient steps (MAML's alpha)",
    "inner_steps": "inner-loop gradient steps on a task's support set during meta-training",
    "test_inner_steps": "inner-loop gradient steps at validation and test time",
    "first_order": "drop the second derivatives of the inner steps from the meta-gradient",
    "model": "the network: conv4, conv4-maxpool, conv4-reference (conv4 as the MAML authors' code builds it) or mlp",
}

# where a method's option means something else than OPTION_HELP says
METHOD_OPTION_HELP = {
    "maml": {
        "learn_inner_lr": "learn one inner step size per parameter tensor and inner step (MAML++'s LSLR)",
        "multi_step_loss": "the query loss after every inner step, not just the last (MAML++)",
        "multi_step_anneal_steps": "with --multi-step-loss: shift its weight onto the last step over this many "
                                   "meta-updates (MAML++'s schedule; 0: equal weights throughout)",
        "adapt_norm": "the inner loop adapts the batch-norm parameters too (the reference code's does not: "
                      "--no-adapt-norm)",
    },
    "platipus": {
        "inner_steps": "inner-loop gradient steps from each sampled set of weights during meta-training",
        "num_samples": "models sampled per task at test time (their predictions are averaged)",
        "train_samples": "weight samples per task in the meta-loss (the paper's Algorithm 1: 1)",
        "kl_weight": "weight of KL(q || p) in the meta-loss",
        "prior_step_init": "initial step size gamma_p of the prior's adaptation (learned)",
        "posterior_step_init": "initial step size gamma_q of the posterior's adaptation (learned)",
        "std_init": "initial standard deviation of every weight's prior and posterior (learned)",
    },
    "protonet": {
        "distance": "euclidean (squared, the paper's choice) or cosine",
        "model": "the embedding network: conv4-embedding, conv4 or conv4-maxpool (used without a head)",
    },
    "matchingnet": {
        "distance": "cosine (the paper's) or euclidean (negative squared distance)",
        "scale": "the attention is softmax(scale * similarity); cosine similarities of ReLU features lie in "
                 "[0, 1], so a scale of 1 keeps the attention diffuse",
        "full_context_embeddings": "embed the support set with a bidirectional LSTM and the query with an "
                                   "attention LSTM (the paper's appendix A.2)",
        "processing_steps": "steps K of the query's attention LSTM (with --full-context-embeddings)",
        "model": "the embedding network: conv4-embedding, conv4 or conv4-maxpool (used without a head)",
    },
    "reptile": {
        "inner_optimizer": "the task-specific optimiser: adam or sgd",
        "inner_lr": "the task-specific optimiser's learning rate",
        "inner_beta1": "Adam's first-moment decay in the inner loop (the reference code: 0, no momentum)",
        "inner_beta2": "Adam's second-moment decay in the inner loop",
        "inner_steps": "mini-batch updates per task during meta-training",
        "inner_batch_size": "support examples per inner mini-batch during meta-training",
        "test_inner_steps": "mini-batch updates per task at validation and test time",
        "test_inner_batch_size": "support examples per inner mini-batch at validation and test time",
        "transductive": "classify a task's query examples in one batch (sharing batch-norm statistics), "
                        "or each with the support set alone",
        "inner_adam_state": "fresh: every task's Adam starts from zero moments; carried: the moments pass "
                            "from task to task and on into evaluation, as in the reference code",
    },
}

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


def _option_for(field: dataclasses.Field, paper_default: bool = False, algorithm: str | None = None) -> click.Option:
    name = "--" + field.name.replace("_", "-")
    hint = field.type if isinstance(field.type, type) else _resolve(field.type)
    # options of the method and of training default to the paper's value for the task, which
    # depends on the other options: --print-config shows what a command line resolves to
    text = METHOD_OPTION_HELP.get(algorithm, {}).get(field.name) or help_of(field) or OPTION_HELP.get(field.name, "")
    if paper_default and field.name != "init_from":
        text = f"{text} {PAPER_DEFAULT}".strip()
    elif not text:
        text = f"(default {field.default})"
    if hint is bool:
        return click.Option([f"{name}/--no-{field.name.replace('_', '-')}"], default=None, help=text)
    click_type = {int: INTEGER, float: float, str: str}.get(hint, str)
    return click.Option([name], type=click_type, default=None, show_default=False, help=text)


def _resolve(annotation: str):
    text = str(annotation).replace(" ", "")
    for name, value in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return value
    return str


TASK_FIELDS = list(dataclasses.fields(TaskConfig))
TRAIN_FIELDS = list(dataclasses.fields(TrainConfig))


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _make_train_command(algorithm: str) -> click.Command:
    config_class = ALGORITHMS[algorithm].Config
    algo_fields = dataclasses.fields(config_class)

    def run(**options):
        ctx = click.get_current_context()
        from metalearn.api import resolve_config, train

        given = lambda fields: {f.name: options[f.name] for f in fields if _given(ctx, f.name)}
        config = resolve_config(
            algorithm,
            task=given(TASK_FIELDS),
            algorithm_config=given(algo_fields),
            train=given(TRAIN_FIELDS),
            resume_from=options["run_dir"] if options["resume"] else None,
        )
        if options["print_config"]:  # what training would refuse, refused here too
            from metalearn.distributed import resolve_device
            from metalearn.training import prepare_training

            resolve_device(options["device"])
            prepare_training(config, options["run_dir"], options["data_dir"], options["resume"])
            click.echo(json.dumps(config.to_dict(), indent=2))
            return
        run_dir, result = train(config, run_dir=options["run_dir"], data_dir=options["data_dir"],
                                resume=options["resume"], progress=options["progress"],
                                evaluate_after=options["eval"], announce=click.echo, device=options["device"])
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun only rank 0 reports
        if result is not None:
            from metalearn.evaluation import format_result

            click.echo(format_result(result))
        click.echo(f"run directory: {run_dir}")

    params = [_option_for(f) for f in TASK_FIELDS] + [_option_for(f, True, algorithm) for f in TRAIN_FIELDS + list(algo_fields)]
    params += [
        click.Option(["--data-dir"], type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP),
        click.Option(["--run-dir"], type=click.Path(path_type=Path), default=None,
                     help="where checkpoints and metrics go (default: a new folder <algorithm>-<dataset>-<shape>-<time> "
                          f"in $METALEARN_RUNS, else runs/ in {CACHE_HELP})"),
        click.Option(["--resume"], is_flag=True, help="continue the run in --run-dir from its checkpoint"),
        click.Option(["--progress/--no-progress"], default=True, help="show a progress bar"),
        click.Option(["--eval/--no-eval"], default=True, help="evaluate on the test split when done"),
        click.Option(["--device"], default="cpu", show_default=True, help=DEVICE_HELP),
        click.Option(["--print-config"], is_flag=True,
                     help="print the full configuration these options resolve to (paper defaults "
                          "filled in) as JSON and exit without training"),
    ]
    return click.Command(algorithm, callback=run, params=params,
                         help=f"Meta-train {algorithm}: {_summary(algorithm)} Unset options take the "
                              "paper's values for the task (--print-config shows them).")


def _summary(algorithm: str) -> str:
    """The first paragraph of the method's module docstring: its name, paper and how it runs."""
    doc = sys.modules[ALGORITHMS[algorithm].__module__].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


@cli.group()
def train():
    """Meta-train a method: metalearn train ALGORITHM --dataset omniglot --ways 5 --shots 1."""


for _name in ALGORITHMS:
    train.add_command(_make_train_command(_name))


# -- eval / plot ------------------------------------------------------------------------------


@cli.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--episodes", type=click.IntRange(min=1), default=None, help="test episodes (default: the run's --eval-episodes: 600, 1000 for protonet and matchingnet)")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="seed of the episodes (with --part val, the run's own seed redraws its validation episodes)")
@click.option("--part", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="the split part to score; val writes eval-part=val.json")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--set", "settings", multiple=True, metavar="OPTION=VALUE",
              help="change a method option for this evaluation, e.g. --set test_inner_steps=10")
@click.option("--ways", type=INTEGER, default=None,
              help="test on episodes of this many classes instead of the run's (methods without "
                   "a per-class output layer: protonet, matchingnet)")
@click.option("--shots", type=INTEGER, default=None, help="support examples per class instead of the run's")
@click.option("--query", type=INTEGER, default=None, help="query examples per class (points, for regression) instead of the run's")
@click.option("--per-step/--final-only", default=True, show_default=True,
              help="also score the predictions after every adaptation step; --final-only gives the same "
                   "final score faster where those steps cost extra (Reptile: about a third of a 20-way evaluation)")
@click.option("--progress/--no-progress", default=True)
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
def eval_command(run_dir, episodes, seed, part, data_dir, settings, ways, shots, query, per_step, progress, device):
    """Evaluate a trained run: mean accuracy (or MSE) with a 95% confidence interval."""
    from metalearn.api import evaluate_run, evaluation_labels
    from metalearn.evaluation import format_result

    overrides = dict(parse_setting(s) for s in settings)
    shape = {k: v for k, v in (("ways", ways), ("shots", shots), ("query", query)) if v is not None}
    result = evaluate_run(run_dir, episodes=episodes, seed=seed, part=part, data_dir=data_dir,
                          progress=progress, overrides=overrides, device=device, episode_shape=shape,
                          per_step=per_step)
    click.echo(format_result(result))
    config = RunDir(run_dir).read_config()
    labels = evaluation_labels(config, overrides, shape, episodes, seed)
    click.echo(f"written to {RunDir(run_dir).eval_file(labels, part)}")


def parse_setting(text: str) -> tuple[str, object]:
    """'test_inner_steps=10' -> ('test_inner_steps', 10); values are JSON, else strings."""
    if "=" not in text:
        raise MetalearnError(f"--set expects OPTION=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.strip().replace("-", "_"), value


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--compare", "compare_with", type=click.Path(path_type=Path), default=None,
              help="another run on the same tasks (e.g. MAML) whose prediction is drawn beside PLATIPUS's samples")
def plot(run_dir, data_dir, compare_with):
    """Draw a run's learning curves (and, for regression, fits after 0/1/10 steps; for PLATIPUS,
    sampled functions) as PNG."""
    from metalearn.api import plot_run

    for path in plot_run(run_dir, data_dir=data_dir, compare_with=compare_with):
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--episodes", type=click.IntRange(min=1), default=600, show_default=True)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="seed of the test episodes")
@click.option("--samples", "num_samples", type=click.IntRange(min=1), default=None, help="models sampled per task (sampling methods)")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="also write the result here")
@click.option("--set", "settings", multiple=True, metavar="OPTION=VALUE",
              help="change a method option of every run for this comparison, e.g. --set test_inner_steps=1")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
def compare(run_dirs, episodes, seed, num_samples, json_path, settings, data_dir):
    """Uncertainty measures of trained runs on the same test episodes: for classification
    accuracy, NLL and expected calibration error; for regression MSE, predictive
    log-likelihood and coverage of the true function by the sampled functions."""
    from metalearn.uncertainty import compare_learners

    labels = {Path(d).name: d for d in run_dirs}
    if len(labels) != len(run_dirs):
        raise MetalearnError("compare labels runs by their folder names; give runs with distinct names")
    overrides = dict(parse_setting(s) for s in settings)
    if json_path:  # found out now, not after minutes of evaluation
        check_writable_file("--json", json_path)
    result = compare_learners(labels, episodes=episodes, seed=seed, num_samples=num_samples, data_dir=data_dir,
                              overrides=overrides)
    measures = [k for k, v in result[next(iter(labels))].items() if isinstance(v, dict)]
    click.echo(f"{result['episodes']} test episodes of {result['dataset']}, seed {seed}")
    click.echo("| run | " + " | ".join(measures) + " |")
    click.echo("| --- |" + " ---: |" * len(measures))
    for label in labels:
        cells = []
        for m in measures:
            value = result[label][m]
            ci = value.get("ci95")
            cells.append(f"{value['mean']:.4g}" + (f" +/- {ci:.2g}" if ci is not None else ""))
        click.echo(f"| {label} | " + " | ".join(cells) + " |")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"written to {json_path}")


def check_writable_file(option: str, path: Path) -> None:
    """Refuse an output file that could not be written: a folder, below a file, or in a folder
    this user cannot write to (its missing folders are made when it is written)."""
    if path.is_dir():
        raise MetalearnError(f"{option} {path} is a folder; give a file name, e.g. {path / 'compare.json'}")
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise MetalearnError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise MetalearnError(f"{option} {path}: cannot write in {existing}")


@cli.command("sample")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--support", multiple=True, required=True, type=click.Path(path_type=Path),
              help="drawings of one character: image files or a folder of them (repeatable)")
@click.option("--num", type=click.IntRange(min=1), default=20, show_default=True, help="new images to draw")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="the PNG grid to write (default RUN_DIR/plots/samples.png)")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True, help="seed of the noise")
def sample_command(run_dir, support, num, out, seed):
    """Draw new images of the character shown by --support with a generative run (statistician):
    a PNG grid, the inputs in the first row and the samples beneath."""
    from metalearn.api import sample_run

    if out is not None:
        check_writable_file("--out", out)
    click.echo(f"wrote {sample_run(run_dir, list(support), num=num, out=out, seed=seed)}")


@cli.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--compare", "compare_with", type=click.Path(path_type=Path), default=None,
              help="another run drawn beside this one's samples (see plot)")
def export_command(run_dir, out_dir, data_dir, compare_with):
    """Write a run's summary.json and plots to OUT_DIR (e.g. results/<name>) for committing."""
    from metalearn.api import export_results

    for path in export_results(run_dir, out_dir, data_dir=data_dir, compare_with=compare_with):
        click.echo(f"wrote {path}")


# -- data -------------------------------------------------------------------------------------


@cli.group()
def data():
    """Omniglot: prepare the cached array, show split sizes, verify integrity."""


@data.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--image-size", type=INTEGER, default=28, show_default=True)
@click.option("--download", is_flag=True, help="fetch the official archives first (checksums verified)")
def prepare(data_dir, image_size, download):
    """Build the cached preprocessed array (once; later loads take well under a second)."""
    from metalearn.data.omniglot import default_data_dir, load_omniglot

    data_dir = data_dir or default_data_dir()
    if download:
        from metalearn.data.download import download_omniglot

        for name, path in download_omniglot(data_dir, progress=True).items():
            click.echo(f"{name}: {path}")
    start = time.perf_counter()
    omniglot = load_omniglot(data_dir, image_size, progress=True)
    click.echo(f"{omniglot.images.shape[0]} characters x {omniglot.images.shape[1]} drawings at "
               f"{image_size}x{image_size} ready in {time.perf_counter() - start:.1f}s "
               f"(content hash {omniglot.content_hash[:16]})")


@data.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--image-size", type=INTEGER, default=28, show_default=True)
def info(data_dir, image_size):
    """Characters and classes in every part of every split."""
    from metalearn.data.omniglot import load_omniglot
    from metalearn.data.splits import PARTS, SPLITS, has_part, omniglot_split

    omniglot = load_omniglot(data_dir, image_size, progress=True)
    click.echo(f"omniglot: {len(omniglot.names)} characters, {omniglot.images.shape[0] * omniglot.images.shape[1]} "
               f"images, {int(omniglot.background.sum())} background / {int((~omniglot.background).sum())} evaluation")
    click.echo(f"{'split':10s} {'part':6s} {'characters':>10s} {'classes':>8s}  rotations")
    for split in SPLITS:
        for part in PARTS:
            if not has_part(split, part):
                continue
            pool = omniglot_split(omniglot, split, part)
            rotations = "random per task" if bool((pool.rotations < 0).any()) else (
                "0/90/180/270 as classes" if bool((pool.rotations > 0).any()) else "none")
            click.echo(f"{split:10s} {part:6s} {pool.num_characters:10d} {len(pool):8d}  {rotations}")


@data.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
def verify(data_dir):
    """Check each archive's PNG content against the official content digest."""
    from metalearn.data.omniglot import verify_release

    results = verify_release(data_dir)
    for archive, ok in results.items():
        click.echo(f"{archive}: {'ok' if ok else 'MISMATCH'}")
    if not all(results.values()):
        raise MetalearnError("the data does not match the official release; download it again")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (torch reports CPU and GPU ones as RuntimeError
    subclasses with these words)."""
    text = str(err)
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def describe_os_error(err: OSError) -> str:
    """One line for a path that cannot be used; "File exists" from making a folder where a
    file is says which it is."""
    if err.filename is None:
        return str(err.strerror or err)
    path = Path(err.filename)
    if err.errno == errno.EEXIST and path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder; give a folder path"
    if err.errno == errno.ENOTDIR:  # a file where the path needs a folder
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"{path}: {blocking} is a file, not a folder"
    return f"{path}: {err.strerror or err}"


def main(args: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    try:
        code = cli.main(args=args, prog_name="metalearn", standalone_mode=False)
        leave_world(orderly=True)
    except TrainingStopped as err:  # Ctrl-C or SIGTERM: the last step is saved
        click.echo(str(err), err=True)
        sys.exit(err.exit_code)
    except MetalearnError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # a path that is a file, a folder, unwritable or gone
        click.echo(f"error: {describe_os_error(err)}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns a KeyboardInterrupt into Abort
        click.echo("interrupted (a training run keeps its last checkpoint: continue it with --resume)", err=True)
        sys.exit(130)
    except NoArgsIsHelpError as err:  # `metalearn`, `metalearn train`: the help, not an "error: Usage: ..."
        click.echo(err.format_message(), err=True)
        sys.exit(err.exit_code)
    except click.UsageError as err:  # one line, as every other mistake, not click's three
        where = f" (see {err.ctx.command_path} --help)" if err.ctx is not None else ""
        click.echo(f"error: {err.format_message()}{where}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        detail = (str(err).splitlines() or [type(err).__name__])[0][:160]
        click.echo(f"error: out of memory ({detail}). Use fewer tasks or images at once, or smaller ones: "
                   "a smaller --meta-batch-size, fewer --ways, --shots, --query or --inner-steps, a smaller "
                   "--image-size; a training run keeps its last checkpoint (continue with --resume).", err=True)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
