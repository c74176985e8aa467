"""A message that names an option reads as its caller spells the option: from Python the
parameter (``resume=True``, ``json_out``, ``overrides={...}``), on the command line the flag
(``--resume``, ``--json``, ``--set``). Each case makes the same mistake both ways and compares
the two messages whole."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_runner import run
from metalearn.api import evaluate_run, predict_run, resolve_config, train
from metalearn.errors import (ConfigError, MetalearnError, MetalearnWarning, OptionError, OptionWarning,
                              TrainingStopped, spellings, valued)

SINUSOID = ["--dataset", "sinusoid", "--meta-batch-size", 2, "--val-every", 0, "--eval-episodes", 2]


def sinusoid(steps: int = 2, **options):
    return resolve_config("maml", task={"dataset": "sinusoid"}, method_config={"test_inner_steps": 1},
                          train={"steps": steps, "meta_batch_size": 2, "val_every": 0, "eval_episodes": 2, **options})


def refusal(code: int, out: str, err: str) -> str:
    """The one error line of a refused command, without its ``error: ``."""
    assert code == 2 and not out and err.startswith("error: ") and err.count("\n") == 1, (code, out, err)
    return err[len("error: "):-1]


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "maml"
    train(sinusoid(), run_dir, progress=False, evaluate_after=False, announce=None)
    return run_dir


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    """(a Prototypical Network's run on class folders, the folder): ten classes of three grey images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"c{c}").mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(root / f"c{c}" / f"{i}.png")
    run_dir = root.parent / "protonet"
    config = resolve_config("protonet", task={"dataset": "folder", "image_size": 28, "channels": 1, "ways": 2,
                                              "shots": 1, "query": 1}, train={"steps": 1, "val_every": 0})
    train(config, run_dir, data_dir=root, progress=False, evaluate_after=False, announce=None)
    return run_dir, root


# -- the mechanism --------------------------------------------------------------------------------


def test_an_option_error_renders_each_spelling_and_keeps_other_braces():
    err = OptionError("{resume} needs {run_dir}, the run to continue", resume=("resume=True", "--resume"),
                      run_dir="run_dir")
    assert isinstance(err, MetalearnError)
    assert str(err) == "resume=True needs run_dir, the run to continue"
    assert err.with_flags() == "--resume needs --run-dir, the run to continue"
    # doubled braces are single ones; a brace around anything but a given option (a path, a JSON
    # example quoted into the template) is kept as it is, and a field's own spelling is never read
    err = OptionError('{{literal}} {split_file}: expected {"train": [...]} in {unknown}, from {quoted}',
                      split_file=valued("split_file", "s{1}.json"), quoted=("{{x}} {run_dir}",) * 2)
    assert str(err) == '{literal} split_file s{1}.json: expected {"train": [...]} in {unknown}, from {{x}} {run_dir}'
    assert err.with_flags() == ('{literal} --split-file s{1}.json: expected {"train": [...]} in {unknown}, from '
                                '{{x}} {run_dir}')
    assert spellings(err) == (str(err), err.with_flags())
    assert spellings(MetalearnError("plain")) == ("plain", "plain")


def test_an_option_warning_and_a_stop_name_options_the_same_way():
    with pytest.warns(MetalearnWarning) as caught:
        warnings.warn(OptionWarning("{keep_best} keeps no checkpoint (give a smaller {val_every}; {{none}})",
                                    keep_best=("keep_best=2", "--keep-best 2"), val_every="val_every"))
    warning = caught[0].message
    assert str(warning) == "keep_best=2 keeps no checkpoint (give a smaller val_every; {none})"
    assert warning.with_flags() == "--keep-best 2 keeps no checkpoint (give a smaller --val-every; {none})"
    stopped = TrainingStopped("stopped as asked ({stop_at}) after step 2", 0, stop_at="stop_at")
    assert (str(stopped), stopped.with_flags(), stopped.exit_code) == (
        "stopped as asked (stop_at) after step 2", "stopped as asked (--stop-at) after step 2", 0)
    plain = TrainingStopped("stopped by SIGTERM in runs/{x}", 143)  # no options: the message as it is
    assert str(plain) == plain.with_flags() == "stopped by SIGTERM in runs/{x}"
    # pickled whole, as a process pool hands a trial's stop back to the parent
    import pickle

    from metalearn.errors import TrainingInterrupted

    for stop in (stopped, TrainingInterrupted("stopped by SIGTERM after step 2 ({stop_at})", 143, stop_at="stop_at")):
        back = pickle.loads(pickle.dumps(stop))
        assert (type(back), str(back), back.with_flags(), back.exit_code) == (
            type(stop), str(stop), stop.with_flags(), stop.exit_code)


def test_a_config_error_names_an_option_of_the_call_beside_its_fields():
    err = ConfigError("TrainConfig", "min_meta_lr", "must be at most `meta_lr` (the value of {preset})",
                      preset=("preset='maml++'", "--preset maml++"))
    assert str(err) == "TrainConfig.min_meta_lr must be at most TrainConfig.meta_lr (the value of preset='maml++')"
    assert err.with_flags() == "--min-meta-lr must be at most --meta-lr (the value of --preset maml++)"
    assert str(ConfigError("TaskConfig", "ways", "must be {2} or more")) == "TaskConfig.ways must be {2} or more"


def test_a_count_is_a_whole_number_within_its_bounds_as_python_int():
    import torch

    from metalearn.errors import check_count

    for given in (True, np.True_, torch.tensor(True), 5.0, "5", None, torch.tensor([5]), np.float64(5)):
        with pytest.raises(MetalearnError, match=r"^episodes must be a whole number of at least 1, got "):
            check_count(given, "episodes")
    for given in (5, np.int64(5), np.int32(5), torch.tensor(5)):
        number = check_count(given, "episodes")
        assert number == 5 and type(number) is int
    assert [check_count(n, "seed", 0, 9) for n in (0, 9)] == [0, 9]  # both bounds allowed
    for outside in (-1, 10):
        with pytest.raises(MetalearnError, match=rf"^seed must be a whole number from 0 to 9, got {outside}$"):
            check_count(outside, "seed", 0, 9)
    # a message of its own and an OptionError naming the option as each caller spells it
    with pytest.raises(OptionError) as caught:
        check_count(0, "stop_at", message="{{stop_at}} takes a step (at least {least}), got {value!r} ({kind})",
                    error=lambda text: OptionError(text, stop_at="stop_at"))
    assert (str(caught.value), caught.value.with_flags()) == (
        "stop_at takes a step (at least 1), got 0 (int)", "--stop-at takes a step (at least 1), got 0 (int)")


# -- the library's messages: Python's spelling, the command line's --------------------------------


def test_a_resume_without_a_run_folder(capsys):
    with pytest.raises(OptionError) as refused:
        train(sinusoid(), resume=True, progress=False, announce=None)
    assert str(refused.value) == "resume=True needs run_dir, the run to continue"
    assert refusal(*run(["train", "maml", *SINUSOID, "--resume"], capsys)) == \
        "--resume needs --run-dir, the run to continue"


def test_stop_at_a_step_past_the_run_and_a_stop_as_asked(tmp_path, capsys):
    with pytest.raises(OptionError) as refused:
        train(sinusoid(2), stop_at=5, progress=False, announce=None)
    assert str(refused.value) == "stop_at=5 is not before the run's last step (2); leave it out to train to the end"
    assert refusal(*run(["train", "maml", *SINUSOID, "--steps", 2, "--stop-at", 5], capsys)) == \
        "--stop-at 5 is not before the run's last step (2); leave it out to train to the end"
    with pytest.raises(OptionError, match=r"^stop_at takes a step number \(a positive integer\), got 0$"):
        train(sinusoid(2), stop_at=0, progress=False, announce=None)
    with pytest.raises(TrainingStopped, match=r"^stopped as asked \(stop_at\) after step 1 of 3; "):
        train(sinusoid(3), tmp_path / "python", stop_at=1, progress=False, announce=None)
    code, _, err = run(["train", "maml", *SINUSOID, "--steps", 3, "--stop-at", 1, "--run-dir", tmp_path / "cli",
                        "--no-progress"], capsys)
    assert code == 0 and err.startswith("stopped as asked (--stop-at) after step 1 of 3; "), err


def test_a_stop_at_before_the_step_of_a_complete_run(tmp_path, capsys):
    """A complete run has no later step before its last: the refusal says it is complete, and
    its advice (a larger --steps with a later --stop-at) works; an annealed run cannot be extended."""
    train(sinusoid(2), tmp_path / "run", progress=False, evaluate_after=False, announce=None)
    with pytest.raises(OptionError) as refused:
        train(sinusoid(2), tmp_path / "run", resume=True, stop_at=1, progress=False, announce=None)
    assert str(refused.value) == ("stop_at=1: the run is complete (step 2 of 2): leave stop_at out; or extend it with "
                                  "a larger steps (e.g. steps=4) and a stop_at after step 2")
    for at, later in ((2, 2), (3, 3)):  # at its last step or beyond it: complete all the same
        with pytest.raises(OptionError, match=rf"^stop_at={later}: the run is complete \(step 2 of 2\)"):
            train(sinusoid(2), tmp_path / "run", resume=True, stop_at=at, progress=False, announce=None)
    command = ["train", "maml", *SINUSOID, "--run-dir", tmp_path / "run", "--resume", "--no-progress"]
    assert refusal(*run([*command, "--steps", 2, "--stop-at", 1], capsys)) == (
        "--stop-at 1: the run is complete (step 2 of 2): leave --stop-at out; or extend it with a larger --steps "
        "(e.g. --steps 4) and a --stop-at after step 2")
    code, _, err = run([*command, "--steps", 4, "--stop-at", 3], capsys)  # the advice followed
    assert code == 0 and err.startswith("stopped as asked (--stop-at) after step 3 of 4; "), err
    train(sinusoid(2, lr_anneal="linear"), tmp_path / "annealed", progress=False, evaluate_after=False, announce=None)
    assert refusal(*run(["train", "maml", *SINUSOID, "--steps", 2, "--lr-anneal", "linear", "--run-dir",
                         tmp_path / "annealed", "--resume", "--stop-at", 1], capsys)) == (
        "--stop-at 1: the run is complete (step 2 of 2): leave --stop-at out; its learning rate is annealed "
        "(linear) over its steps, so it cannot be extended")


def test_a_device_that_is_none(capsys):
    with pytest.raises(OptionError) as refused:
        train(sinusoid(), device="gpu", progress=False, announce=None)
    assert str(refused.value) == "device must be cpu, cuda, cuda:N or auto, got 'gpu'"
    assert refusal(*run(["train", "maml", *SINUSOID, "--device", "gpu"], capsys)) == \
        "--device must be cpu, cuda, cuda:N or auto, got 'gpu'"
    # from Python a torch.device is a device; anything else but text is refused in one line
    for given in (None, 5):
        with pytest.raises(OptionError) as refused:
            train(sinusoid(), device=given, progress=False, announce=None)
        assert str(refused.value) == (f"device must be cpu, cuda, cuda:N or auto (text or a torch.device), got "
                                      f"{given!r} ({type(given).__name__})")
    import torch

    from metalearn.distributed import init_world

    assert init_world(torch.device("cpu")).device == torch.device("cpu")


def test_an_override_that_evaluation_does_not_use(regression_run, capsys):
    with pytest.raises(OptionError) as refused:
        evaluate_run(regression_run, overrides={"first_order": True}, progress=False)
    tail = ": first_order is an option of meta-training, which an evaluation does not change; leave it out"
    assert str(refused.value) == "overrides={'first_order': True}" + tail
    assert refusal(*run(["eval", regression_run, "--set", "first_order=true"], capsys)) == \
        "--set first_order=True" + tail


def test_a_split_for_a_run_of_a_fixed_split_and_a_split_file_that_is_none(regression_run, folder_run, tmp_path,
                                                                            capsys):
    split = tmp_path / "split.json"
    with pytest.raises(OptionError) as refused:
        evaluate_run(regression_run, split_file=split, progress=False)
    tail = " applies to runs on class folders ({}); this run's dataset is sinusoid, whose split is fixed"
    assert str(refused.value) == "split_file" + tail.format("dataset='folder'")
    assert refusal(*run(["eval", regression_run, "--split-file", split], capsys)) == \
        "--split-file" + tail.format("--dataset folder")
    run_dir, images = folder_run
    tail = f" {split}: no such file; give the JSON file " + '{"train": [class, ...], "val": [...], "test": [...]}'
    with pytest.raises(OptionError) as refused:
        evaluate_run(run_dir, data_dir=images, split_file=split, progress=False)
    assert str(refused.value) == "split_file" + tail
    assert refusal(*run(["eval", run_dir, "--data-dir", images, "--split-file", split, "--no-progress"], capsys)) == \
        "--split-file" + tail


def test_predict_names_its_outputs_and_inputs_as_given(folder_run, tmp_path, capsys):
    run_dir, images = folder_run
    out = f"{tmp_path / 'out'}/"  # a folder, where a file is wanted
    tail = f" {out} names a folder; give a file name, e.g. {tmp_path / 'out' / 'predictions.json'}"
    with pytest.raises(OptionError) as refused:
        predict_run(run_dir, images, images, json_out=out)
    assert str(refused.value) == "json_out" + tail
    assert refusal(*run(["predict", run_dir, "--support", images, "--query", images, "--json", out], capsys)) == \
        "--json" + tail
    nowhere = tmp_path / "nowhere"
    tail = f" {nowhere} does not exist; give a folder with one sub-folder per class"
    with pytest.raises(OptionError) as refused:
        predict_run(run_dir, nowhere, images / "c0")
    assert str(refused.value) == "support" + tail
    assert refusal(*run(["predict", run_dir, "--support", nowhere, "--query", images / "c0"], capsys)) == \
        "--support" + tail


def test_a_warning_names_options_as_its_caller_gave_them(capsys):
    with pytest.warns(OptionWarning) as caught:
        resolve_config("maml", task={"dataset": "sinusoid"}, train={"steps": 1, "val_every": 100, "keep_best": 2})
    text = "{} keeps no checkpoint: validation every 100 steps never runs in {} (give a smaller {})"
    assert [str(w.message) for w in caught] == [text.format("keep_best=2", "steps=1", "val_every")]
    code, out, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--val-every", 100, "--keep-best", 2,
                          "--print-config"], capsys)
    assert code == 0 and out.startswith("{")
    assert err == "warning: " + text.format("--keep-best 2", "--steps 1", "--val-every") + "\n"


def test_an_evaluation_names_the_method_options_it_changes_as_overrides_or_set():
    err = ConfigError("MAML.Config", ("choose_k", "test_inner_steps"), "must be at most `memory_size`")
    err.name_overrides({"choose_k", "memory_size", "test_inner_steps"}, {"memory_size", "test_inner_steps"})
    # from Python a field of the call's overrides by its key, the run's own by its config; on the command line --set
    assert str(err) == ("MAML.Config.choose_k, overrides['test_inner_steps'] must be at most "
                        "overrides['memory_size']")
    assert err.with_flags() == "--set choose_k, --set test_inner_steps must be at most --set memory_size"


def test_an_announcement_names_options_as_its_caller_gave_them():
    from metalearn.errors import OptionLine

    line = OptionLine("{said} ({steps}: no training)", said=("runs/{{x}}",) * 2, steps=("steps=0", "--steps 0"))
    assert isinstance(line, str) and line == "runs/{{x}} (steps=0: no training)"
    assert line.with_flags() == "runs/{{x}} (--steps 0: no training)"
    import copy
    import pickle

    for again in (copy.copy(line), copy.deepcopy(line), pickle.loads(pickle.dumps(line))):  # from the template
        assert again == line and again.with_flags() == line.with_flags()


# -- messages that name a command or a flag of it: the call from Python, the command on the shell ---------


def test_a_run_of_0_steps_is_announced_with_steps_as_given(tmp_path, capsys):
    lines = []
    train(sinusoid(0), tmp_path / "python", progress=False, evaluate_after=False, announce=lines.append)
    assert lines == [f"starting: maml on sinusoid, run directory {tmp_path / 'python'} (steps=0: no training; the "
                     "initial weights are saved)"]
    code, out, err = run(["train", "maml", *SINUSOID, "--steps", 0, "--no-eval", "--no-progress", "--run-dir",
                          tmp_path / "cli"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == (f"starting: maml on sinusoid, run directory {tmp_path / 'cli'} (--steps 0: no "
                                   "training; the initial weights are saved)")


def test_keep_best_without_validation_names_the_ensemble_evaluation(capsys):
    with pytest.raises(ConfigError) as refused:
        resolve_config("maml", task={"dataset": "sinusoid"}, train={"keep_best": 2, "val_every": 0})
    assert str(refused.value) == ("TrainConfig.keep_best applies only with validation (TrainConfig.val_every above 0); "
                                  "without it evaluate_run(run_dir, ensemble=True) would find none")
    assert refusal(*run(["train", "maml", "--dataset", "sinusoid", "--keep-best", 2, "--val-every", 0,
                         "--print-config"], capsys)) == (
        "--keep-best applies only with validation (--val-every above 0); without it `metalearn eval --ensemble` "
        "would find none")


def test_a_split_of_mini_imagenet_names_the_folder_dataset(capsys):
    text = ("{} does not apply to mini-imagenet: its split is the release's own, its train.csv, val.csv and test.csv "
            "or its train/ val/ test/ folders (to split class folders of your own, use {})")
    with pytest.raises(ConfigError) as refused:
        resolve_config("protonet", task={"dataset": "mini-imagenet", "split_fractions": "0.5,0,0.5"})
    assert str(refused.value) == text.format("TaskConfig.split_fractions", "dataset='folder'")
    assert refusal(*run(["train", "protonet", "--dataset", "mini-imagenet", "--data-dir", "mini", "--split-fractions",
                         "0.5,0,0.5"], capsys)) == text.format("--split-fractions", "--dataset folder")


def test_a_folder_that_does_not_exist(folder_run, tmp_path, capsys):
    run_dir, _ = folder_run
    nowhere = tmp_path / "nowhere"
    config = resolve_config("protonet", resume_from=run_dir)
    tail = f" {nowhere} does not exist; give the folder that holds one folder per class"
    with pytest.raises(OptionError) as refused:
        train(config, tmp_path / "python", data_dir=nowhere, progress=False, announce=None)
    assert str(refused.value) == "data_dir" + tail
    assert refusal(*run(["train", "protonet", "--dataset", "folder", "--image-size", 28, "--channels", 1, "--data-dir",
                         nowhere, "--steps", 1, "--print-config"], capsys)) == "--data-dir" + tail


def test_a_run_scored_on_a_folder_without_its_classes(folder_run, tmp_path, capsys):
    run_dir, _ = folder_run
    other = tmp_path / "other"
    for c in range(3):
        (other / f"d{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((28, 28), 40 * c + i, np.uint8), "L").save(other / f"d{c}" / f"{i}.png")
    with pytest.raises(OptionError) as refused:
        evaluate_run(run_dir, data_dir=other, progress=False)
    python = str(refused.value)
    assert python.endswith(": give data_dir the folder it trained on, or split this folder's classes yourself "
                           "(split_fractions, split_file; for a folder of classes the run never saw, "
                           "split_fractions='0,0,1' in evaluate_run scores every class)"), python
    start = python[:python.index(": give data_dir")]
    assert refusal(*run(["eval", run_dir, "--data-dir", other, "--no-progress"], capsys)) == (
        start + ": give --data-dir the folder it trained on, or split this folder's classes yourself "
        "(--split-fractions, --split-file; for a folder of classes the run never saw, --split-fractions 0,0,1 in "
        "metalearn eval scores every class)")


def test_a_resume_as_another_method_names_the_call_that_continues_it(regression_run, capsys):
    text = "{} is a maml run, not reptile: continue it with `{}`, or train reptile in another {}"
    with pytest.raises(OptionError) as refused:
        resolve_config("reptile", resume_from=regression_run)
    path = repr(str(regression_run))
    assert str(refused.value) == text.format(
        regression_run, f"metalearn.train(metalearn.resolve_config('maml', resume_from={path}), run_dir={path}, "
                        "resume=True)", "run_dir")
    assert refusal(*run(["train", "reptile", "--resume", "--run-dir", regression_run, "--no-progress"], capsys)) == \
        text.format(regression_run, f"metalearn train maml --resume --run-dir {regression_run}", "--run-dir")


def test_a_stop_names_the_call_that_goes_on(tmp_path, capsys):
    runs = {"python": tmp_path / "python", "cli": tmp_path / "cli"}
    going_on = {"python": f"continue with `metalearn.train(config, run_dir={str(runs['python'])!r}, resume=True)`",
                "cli": f"continue with `metalearn train maml --run-dir {runs['cli']} --resume`"}
    with pytest.raises(TrainingStopped) as stopped:
        train(sinusoid(3), runs["python"], stop_at=1, progress=False, announce=None)
    assert str(stopped.value) == (f"stopped as asked (stop_at) after step 1 of 3; its checkpoint is saved in "
                                  f"{runs['python']}: {going_on['python']}")
    command = ["train", "maml", *SINUSOID, "--steps", 3, "--stop-at", 1, "--run-dir", runs["cli"], "--no-progress"]
    code, _, err = run(command, capsys)
    assert code == 0 and err == (f"stopped as asked (--stop-at) after step 1 of 3; its checkpoint is saved in "
                                 f"{runs['cli']}: {going_on['cli']}\n"), err
    # asked again for the step it is at: nothing to train, the same advice
    with pytest.raises(TrainingStopped) as stopped:
        train(sinusoid(3), runs["python"], resume=True, stop_at=1, progress=False, announce=None)
    assert str(stopped.value) == f"the run is at step 1 of 3 already (stop_at); {going_on['python']}"
    code, _, err = run([*command, "--resume"], capsys)
    assert code == 0 and err == f"the run is at step 1 of 3 already (--stop-at); {going_on['cli']}\n", err


def test_a_summary_of_runs_not_scored_names_the_evaluation(regression_run, capsys):
    from metalearn.aggregate import summarize_runs

    text = "{} holds no eval-x.json: score it first ({}, with the options the name lists)"
    with pytest.raises(OptionError) as refused:
        summarize_runs([regression_run], evaluation="eval-x")
    assert str(refused.value) == text.format(regression_run, f"evaluate_run({str(regression_run)!r})")
    assert refusal(*run(["summarize", regression_run, "--evaluation", "eval-x"], capsys)) == \
        text.format(regression_run, f"metalearn eval {regression_run}")


def test_an_override_of_a_value_the_method_refuses(regression_run, capsys):
    with pytest.raises(ConfigError) as refused:
        evaluate_run(regression_run, overrides={"test_inner_steps": -1}, progress=False)
    assert str(refused.value) == "overrides['test_inner_steps'] must be >= 0, got -1"
    assert refusal(*run(["eval", regression_run, "--set", "test_inner_steps=-1"], capsys)) == \
        "--set test_inner_steps must be >= 0, got -1"
