"""What a run records about how it was made guards the commands that read it again: export
refuses an OUT_DIR inside the image folder the run trained on (recorded in its checkpoint) or
inside the run folder; eval warns of a folder that is not the one the run trained on; a run
trained from Python with a network of the user's own is named as such by eval and status."""

from __future__ import annotations

import json
import shutil

import pytest
from torch import nn

from cli_runner import run
from images import colours
from metalearn.errors import TrainingStopped
from metalearn.runs import RunDir

# what eval writes before scoring where no progress bar shows (--no-progress)
EVALUATING = "evaluating the checkpoint of step 1 on 2 test episodes...\n"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A one-step ProtoNet run on 6 class folders (3 to train on, 3 to test), and its data."""
    root = tmp_path_factory.mktemp("guard")
    data = colours(root / "photos", 6, 2)
    code = run(["train", "protonet", "--dataset", "folder", "--data-dir", data, "--ways", 2, "--shots", 1,
                "--image-size", 16, "--steps", 1, "--log-every", 1, "--val-every", 0, "--split-fractions",
                "0.5,0,0.5", "--no-eval", "--run-dir", root / "run", "--no-progress"], _Quiet())[0]
    assert code == 0
    return root / "run", data


class _Quiet:  # capsys stands in for module-scoped use
    def readouterr(self):
        return "", ""


def files_in(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_export_without_data_dir_refuses_an_out_dir_inside_the_folder_the_run_trained_on(folder_run, tmp_path,
                                                                                         capsys):
    run_dir, data = folder_run
    assert RunDir(run_dir).read_checkpoint()["data_dir"] == str(data.resolve())  # absolute, a plain str
    before = files_in(data)
    for out in (data / "exp", data / "class 0"):
        code, _, err = run(["export", run_dir, out], capsys)
        assert code == 2 and err == (f"error: OUT_DIR {out} lies inside {data.resolve()}, the image folder the run "
                                     f"trained on (its checkpoint records it): its files would be read as images "
                                     f"of the dataset; give a folder outside {data.resolve()}\n"), err
    assert files_in(data) == before  # no class `exp`, no plot among a class's images
    code, _, err = run(["export", run_dir, tmp_path / "out"], capsys)
    assert code == 0 and (tmp_path / "out" / "summary.json").is_file(), err


def test_a_checkpoint_from_before_the_recorded_folder_exports_as_before(folder_run, tmp_path, capsys):
    run_dir = shutil.copytree(folder_run[0], tmp_path / "run")
    state = RunDir(run_dir).read_checkpoint()
    del state["data_dir"], state["learner_source"]
    RunDir(run_dir).write_checkpoint(state)
    code, _, err = run(["export", run_dir, tmp_path / "out"], capsys)
    assert code == 0 and (tmp_path / "out" / "summary.json").is_file(), err
    code, out, err = run(["eval", run_dir, "--data-dir", folder_run[1], "--episodes", 2, "--no-progress"], capsys)
    assert code == 0 and "accuracy" in out and "warning" not in err, err


def test_export_refuses_the_run_folder_and_its_best_folder_but_not_a_folder_around_it(folder_run, tmp_path,
                                                                                       capsys):
    run_dir = shutil.copytree(folder_run[0], tmp_path / "runs" / "photos")
    before = files_in(run_dir)
    for out, what in ((run_dir, "is the run folder"), (run_dir / "best", "lies inside the best checkpoints' folder of"),
                      (run_dir / "best" / "x", "lies inside the best checkpoints' folder of")):
        code, _, err = run(["export", run_dir, out], capsys)
        assert code == 2 and err == (f"error: OUT_DIR {out} {what} {run_dir}: the record would lie among the run's "
                                     f"own files; give another folder (e.g. results/photos, or {run_dir / 'plots'})\n"), err
    assert files_in(run_dir) == before
    code, _, err = run(["export", run_dir, run_dir / "record"], capsys)  # a folder of its own inside the run's
    assert code == 0 and (run_dir / "record" / "summary.json").is_file(), err
    code, _, err = run(["export", run_dir, tmp_path / "runs"], capsys)  # the run folder inside OUT_DIR: a record
    assert code == 0 and (tmp_path / "runs" / "summary.json").is_file(), err
    # another run's folder, or a folder inside it, is refused as the run's own is
    other = shutil.copytree(folder_run[0], tmp_path / "other")
    theirs = files_in(other)
    for out, what in ((other, "is"), (other / "sub", "lies inside")):
        code, _, err = run(["export", run_dir, out], capsys)
        assert code == 2 and err == (f"error: OUT_DIR {out} {what} the folder of another run, {other}: the record "
                                     "would lie among that run's files; give another folder (e.g. results/photos)\n"), err
    assert files_in(other) == theirs
    # a record (config.json and metrics.jsonl, no checkpoint, as under results/) is no run folder
    record = tmp_path / "results" / "photos"
    record.mkdir(parents=True)
    shutil.copy(other / "config.json", record / "config.json")
    code, _, err = run(["export", run_dir, record], capsys)
    assert code == 0 and (record / "summary.json").is_file(), err


def test_eval_on_another_folder_with_the_same_class_names_warns_and_scores(folder_run, tmp_path, capsys):
    """The run's test classes are found by name in its split.json: on a folder that is not the
    one it trained on they may be classes it trained on. Said in one line; the score stands,
    since a folder that gained classes or images is rightly scored on the run's own split."""
    run_dir = shutil.copytree(folder_run[0], tmp_path / "run")
    data = folder_run[1]
    code, out, err = run(["eval", run_dir, "--data-dir", data, "--episodes", 2, "--no-progress"], capsys)
    assert code == 0 and "accuracy" in out and "warning" not in err, err  # fractions then, split.json now: equal
    other = colours(tmp_path / "other", 6, 2, seed=7)  # the same class names, other images
    code, out, err = run(["eval", run_dir, "--data-dir", other, "--episodes", 2, "--no-progress"], capsys)
    assert code == 0 and "accuracy" in out, err
    assert err == (f"warning: --data-dir {other} holds other images than the run in {run_dir} trained on (6 classes, "
                   "12 images either way, other images, class names or parts): the classes scored are taken by name "
                   "from its split.json, so a class renamed or replaced since may be one it trained on\n"
                   + EVALUATING), err
    # scored, in a file of its own that names the folder: the run's own evaluation stays
    scored = json.loads(next(run_dir.glob("eval-data=other-*-episodes=2.json")).read_text())
    assert scored["episodes"] == 2 and scored["data_dir"] == str(other.resolve())
    assert json.loads(RunDir(run_dir).eval_file({"episodes": 2}).read_text())["data_dir"] == str(data.resolve())
    grown = shutil.copytree(data, tmp_path / "grown")
    colours(tmp_path / "new", 1, 3, seed=3)
    shutil.move(tmp_path / "new" / "class 0", grown / "class 6")
    code, _, err = run(["eval", run_dir, "--data-dir", grown, "--episodes", 2, "--no-progress"], capsys)
    assert code == 0 and err.count("\n") == 2 and err.endswith(EVALUATING), err
    assert "trained on (6 classes, 12 images, now 7 classes, 15 images): " in err, err


def test_a_run_reads_the_folder_it_records_and_files_another_folders_scores_apart(folder_run, tmp_path, capsys):
    """The checkpoint records the image folder: eval, compare and a resume read it without
    --data-dir. A score of another folder goes to a file named by that folder, never to
    eval.json; compare warns of another folder as eval does; a resume given another folder
    whose split cannot apply says first that it is not the run's folder."""
    run_dir = shutil.copytree(folder_run[0], tmp_path / "run")
    data = folder_run[1]
    code, out, err = run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)
    assert code == 0 and err == EVALUATING and f"written to {run_dir / 'eval-episodes=2.json'}" in out, err
    other = colours(tmp_path / "other", 6, 2, seed=7)
    for folder in (tmp_path / "other", data):  # two folders, two files
        code, out, err = run(["eval", run_dir, "--data-dir", folder, "--split-fractions", "0,0,1", "--episodes", 2,
                              "--no-progress"], capsys)
        assert code == 0, err
    import hashlib

    named = f"other-{hashlib.sha256(str(other.resolve()).encode()).hexdigest()[:6]}"  # name, hash of its path
    names = sorted(p.name for p in run_dir.glob("eval*.json"))
    assert names == [f"eval-data={named}-episodes=2-split_fractions=0,0,1.json",
                     "eval-episodes=2-split_fractions=0,0,1.json", "eval-episodes=2.json"], names
    import torch

    from metalearn.evaluation_setup import other_images_label

    moved = shutil.copytree(run_dir, tmp_path / "moved-run")  # its folder gone: the one given is its images, moved
    state = torch.load(moved / "checkpoint.pt", weights_only=True)
    torch.save({**state, "data_dir": str(tmp_path / "gone")}, moved / "checkpoint.pt")
    assert other_images_label(RunDir(moved), other) == {} and other_images_label(RunDir(run_dir), data) == {}
    code, out, err = run(["compare", run_dir, "--episodes", 2], capsys)
    assert code == 0 and err == "", err
    # a run of another dataset is named as such, not as a run without a recorded split
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2, "--no-eval",
                "--run-dir", tmp_path / "waves", "--no-progress"], capsys)[0] == 0
    code, out, err = run(["compare", run_dir, tmp_path / "waves", "--episodes", 2], capsys)
    assert code == 2 and err == ("error: runs 'run' and 'waves' are tested on different tasks (dataset folder vs "
                                 "sinusoid); compare runs of the same task\n"), err
    elsewhere = shutil.copytree(run_dir, tmp_path / "elsewhere")  # a run that records another folder
    state = torch.load(elsewhere / "checkpoint.pt", weights_only=True)
    torch.save({**state, "data_dir": str(other.resolve())}, elsewhere / "checkpoint.pt")
    code, out, err = run(["compare", run_dir, elsewhere, "--episodes", 2], capsys)
    assert code == 2 and err == (f"error: runs 'run' and 'elsewhere' trained on different image folders "
                                 f"({data.resolve()}, {other.resolve()}): compare scores every run on the same "
                                 "episodes; give --data-dir, the folder to draw them from\n"), err
    code, out, err = run(["compare", run_dir, "--episodes", 2, "--data-dir", other], capsys)
    assert code == 0 and err.startswith(f"warning: --data-dir {other} holds other images than the run in {run_dir} "
                                        "trained on"), err
    parts = tmp_path / "parts"
    for part in ("train", "test"):
        shutil.copytree(data / "class 0", parts / part / "class 0")
    code, _, err = run(["train", "protonet", "--resume", "--run-dir", run_dir, "--steps", 2, "--data-dir", parts,
                        "--no-eval", "--no-progress"], capsys)
    assert code == 2 and err.startswith(f"error: --data-dir {parts} is not the folder the run in {run_dir} trained on "
                                        f"({data.resolve()}; leave --data-dir out to resume on it): "), err
    code, _, err = run(["train", "protonet", "--resume", "--run-dir", run_dir, "--steps", 2, "--no-eval",
                        "--no-progress"], capsys)
    assert code == 0, err


def sinusoid_trainer(run_dir, network: nn.Module | None = None):
    """A one-step MAML run on sinusoids trained from Python, as the tutorial's "Your own tasks
    with the Trainer": the library's network where ``network`` is None."""
    from metalearn import MAML, SinusoidTasks, Trainer, build_learner, resolve_config
    from metalearn.tasks import problem_of

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 1, "meta_batch_size": 2, "val_every": 0, "log_every": 1})
    learner = (build_learner("maml", config.method_config, problem_of(config.task)) if network is None
               else MAML(network, MAML.Config(**config.method_config)))
    Trainer(config, learner, SinusoidTasks(shots=5, query=5), None, run_dir).fit(progress=False)
    return learner


def test_a_run_with_a_network_of_the_user_s_own_is_named_so_by_eval_plot_and_status(tmp_path, capsys):
    run_dir = tmp_path / "custom"
    learner = sinusoid_trainer(run_dir, nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)))
    for command in (["eval", run_dir, "--episodes", 2, "--no-progress"], ["plot", run_dir]):
        code, _, err = run(command, capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: {run_dir} was trained with a network of your own (in a "
                              "metalearn.algorithms.maml.MAML) that its config.json does not describe ("), err
        assert ("learner.load_state_dict(RunDir(run_dir).read_checkpoint()['learner']) and score them with "
                "metalearn.evaluate(learner, your_tasks)") in err, err
    assert not list(run_dir.glob("eval*.json"))
    code, out, _ = run(["status", run_dir], capsys)
    assert code == 0 and "metalearn eval" not in out, out
    assert (f"complete; not tested yet: trained with a network of your own, which config.json does not describe: in "
            f"Python, `learner.load_state_dict(RunDir('{run_dir}').read_checkpoint()['learner']); "
            "metalearn.evaluate(learner, your_tasks)`") in out, out
    status = json.loads(run(["status", run_dir, "--json"], capsys)[1])[0]
    assert status["own"] == ["network"] and status["test"].startswith("learner.load_state_dict(")
    learner.load_state_dict(RunDir(run_dir).read_checkpoint()["learner"])  # the route it names


def test_a_learner_of_the_user_s_own_with_the_library_s_network_evaluates_as_any_run(tmp_path, capsys):
    run_dir = tmp_path / "library"
    sinusoid_trainer(run_dir)
    assert RunDir(run_dir).read_checkpoint()["learner_source"] == "metalearn.algorithms.maml.MAML"
    status = json.loads(run(["status", run_dir, "--json"], capsys)[1])[0]
    assert status["own"] == [] and status["test"] == f"metalearn eval {run_dir}"
    code, out, err = run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)
    assert code == 0 and out.startswith("MSE "), err


def test_a_run_that_the_cli_trained_records_its_learner_as_the_registry_s(tmp_path, capsys):
    assert run(["train", "maml", "--steps", 1, "--meta-batch-size", 2, "--val-every", 0, "--no-eval",
                "--run-dir", tmp_path / "run", "--no-progress"], capsys)[0] == 0
    state = RunDir(tmp_path / "run").read_checkpoint()
    assert state["learner_source"] == "method:maml" and "data_dir" not in state  # sinusoids: no folder
    assert json.loads(run(["status", tmp_path / "run", "--json"], capsys)[1])[0]["own"] == []
    assert state["step"] == 1


class LineTasks:  # the user's own task source (sinusoids under another name)
    def __init__(self, **shape):
        from metalearn import SinusoidTasks

        self.tasks = SinusoidTasks(**shape)

    def sample(self, num_tasks, generator, tasks=None):
        return self.tasks.sample(num_tasks, generator, tasks)


def test_status_of_a_run_on_tasks_of_the_user_s_own_gives_the_python_lines(tmp_path, capsys):
    from metalearn import Trainer, build_learner, resolve_config
    from metalearn.tasks import problem_of

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 2, "meta_batch_size": 2, "val_every": 0, "log_every": 1})
    learner = build_learner("maml", config.method_config, problem_of(config.task))
    with pytest.raises(TrainingStopped, match=r"\(stop_at\)"):
        Trainer(config, learner, LineTasks(shots=5, query=5), None, tmp_path / "lines").fit(progress=False,
                                                                                           stop_at=1)
    status = json.loads(run(["status", tmp_path / "lines", "--json"], capsys)[1])[0]
    assert status["own"] == ["tasks"] and status["state"] == "stopped"
    assert status["resume"].startswith("Trainer(config, learner, train_tasks, val_tasks, ")
    assert status["resume"].endswith(", resume=True).fit()")
    out = run(["status", tmp_path / "lines"], capsys)[1]
    assert ("stopped; trained with tasks of your own, which config.json does not describe: in Python, "
            "`Trainer(config, ") in out
    assert "metalearn train" not in out, out
    # the pause names the Python route, and metalearn train --resume, which would build sinusoids
    # from config.json and go on training on them, is refused
    code, _, err = run(["train", "maml", "--run-dir", tmp_path / "lines", "--resume", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "was trained on a task source of your own (" in err, err
    assert "continue it from Python: Trainer(config, learner, train_tasks, val_tasks, " in err, err
    assert RunDir(tmp_path / "lines").read_checkpoint()["step"] == 1


def test_a_pause_of_a_run_trained_from_python_names_the_python_route(tmp_path, capsys):
    from metalearn import MAML, SinusoidTasks, Trainer, resolve_config

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 2, "meta_batch_size": 2, "val_every": 0, "log_every": 1})
    learner = MAML(nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1)), MAML.Config(**config.method_config))
    route = r"continue from Python: Trainer\(config, .*resume=True\)\.fit\(\)"
    with pytest.raises(TrainingStopped, match=route) as stopped:
        Trainer(config, learner, SinusoidTasks(shots=5, query=5), None, tmp_path / "own").fit(progress=False,
                                                                                             stop_at=1)
    assert "metalearn train" not in str(stopped.value)
    code, _, err = run(["train", "maml", "--run-dir", tmp_path / "own", "--resume", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "was trained with a network of your own (in a metalearn.algorithms.maml.MAML)" in err, err
    # the route it names continues the run (fit restores the checkpoint)
    trainer = Trainer(config, learner, SinusoidTasks(shots=5, query=5), None, tmp_path / "own", resume=True)
    trainer.fit(progress=False)
    assert trainer.step == 2 and RunDir(tmp_path / "own").read_checkpoint()["step"] == 2


def test_a_pause_of_a_python_run_the_commands_can_rebuild_names_metalearn_train(tmp_path):
    from metalearn import SinusoidTasks, Trainer, build_learner, resolve_config
    from metalearn.tasks import problem_of

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 2, "meta_batch_size": 2, "val_every": 0, "log_every": 1})
    learner = build_learner("maml", config.method_config, problem_of(config.task))  # the library's network
    with pytest.raises(TrainingStopped) as stopped:
        Trainer(config, learner, SinusoidTasks(shots=5, query=5), None, tmp_path / "lib").fit(progress=False,
                                                                                             stop_at=1)
    # from Python the call that goes on (metalearn.train rebuilds it), on the command line the command
    assert str(stopped.value).endswith(f"continue with `metalearn.train(config, run_dir={str(tmp_path / 'lib')!r}, "
                                       "resume=True)`")
    assert stopped.value.with_flags().endswith(f"continue with `metalearn train maml --run-dir {tmp_path / 'lib'} "
                                               "--resume`")


def test_a_run_on_examples_of_one_s_own_is_refused_by_the_commands_before_they_read_a_dataset(tmp_path, capsys,
                                                                                                  monkeypatch):
    """EpisodeSampler.from_labels draws the user's examples, which config.json's dataset (named
    for its defaults) does not describe: eval and train --resume say so in one line, before they
    look for that dataset's files (here there are none), and name the Python route."""
    import torch

    from metalearn import EpisodeSampler, ProtoNet, Trainer, resolve_config
    from metalearn.models import MLP

    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "no-omniglot"))
    labels = torch.arange(60) % 6
    sampler = EpisodeSampler.from_labels(torch.randn(60, 4), labels, ways=2, shots=1, query=1)
    config = resolve_config("protonet", task={"dataset": "omniglot", "ways": 2, "shots": 1, "query": 1},
                            train={"steps": 2, "meta_batch_size": 2, "val_every": 0, "log_every": 1})
    with pytest.raises(TrainingStopped):
        Trainer(config, ProtoNet(MLP(4, None, hidden=(8,))), sampler, None, tmp_path / "run").fit(
            progress=False, stop_at=1)
    own = "was trained on a task source of your own (EpisodeSampler.from_labels (your data))"
    code, _, err = run(["train", "protonet", "--run-dir", tmp_path / "run", "--resume", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and own in err and "resume=True).fit()" in err, err
    code, _, err = run(["eval", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "trained on a task source of your own" in err, err
    code, out, err = run(["status", tmp_path / "run"], capsys)
    assert code == 0 and "and tasks of your own, which config.json" in out and "resume=True).fit()" in out, out + err


def test_a_run_on_an_episode_sampler_of_one_s_own_images_is_one_of_one_s_own_tasks(tmp_path, capsys, monkeypatch):
    """An EpisodeSampler built in Python draws images the user chose (any pool, any images),
    which config.json's dataset need not describe: eval refuses the run in one line rather than
    score that dataset. The samplers build_task_source builds (test True or False) are the
    registry's and name no source of their own."""
    import torch

    from metalearn import EpisodeSampler, ProtoNet, Trainer, resolve_config
    from metalearn.data.splits import ClassPool
    from metalearn.models import MLP

    monkeypatch.setenv("METALEARN_DATA", str(tmp_path / "no-omniglot"))
    images = torch.randint(0, 256, (6, 4, 2, 2), dtype=torch.uint8)  # 6 classes of 4 grey 2x2 images
    pool = ClassPool("mine", torch.arange(6), torch.zeros(6, dtype=torch.long))
    assert EpisodeSampler(images, pool, 2, 1, 1, test=False).source_name is None
    sampler = EpisodeSampler(images, pool, 2, 1, 1)
    config = resolve_config("protonet", task={"dataset": "omniglot", "ways": 2, "shots": 1, "query": 1},
                            train={"steps": 2, "meta_batch_size": 2, "val_every": 0, "log_every": 1})
    with pytest.raises(TrainingStopped):
        Trainer(config, ProtoNet(torch.nn.Sequential(torch.nn.Flatten(), MLP(4, None, hidden=(8,)))), sampler, None,
                tmp_path / "run").fit(progress=False, stop_at=1)
    code, _, err = run(["eval", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "task source of your own (EpisodeSampler (your data))" in err, err
