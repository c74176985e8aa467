"""Adding a method or a dataset is one class and one registration: a toy method and a toy
dataset, defined in the tests (toys.py) and nowhere in the library, train, evaluate, resume and
print their configuration through the command line with no other change."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from cli_runner import run
from metalearn.algorithms import METHODS, MetaLearner, register_method
from metalearn.datasets import DATASETS, Dataset, register_dataset
from metalearn.errors import ConfigError, MetalearnError
from metalearn.options import option, options
from metalearn.tasks.batch import Problem, TaskBatch
from toys import Blobs, NearestMean, NearestMeanConfig


@pytest.fixture
def toy_registry():
    """The toy method and dataset registered for one test, and removed after it."""
    register_method(NearestMean)
    register_dataset(Dataset("toy-blobs", True, build=lambda task, shape, part, data_dir, progress: Blobs(
        shape.ways, shape.shots, shape.query), problem=lambda task: Problem((6,), task.ways, True),
        inapplicable=("noise_std", "image_size"), reasons={"image_size": "its points are 6 numbers, not images"}))
    yield
    METHODS.pop(NearestMean.name)
    DATASETS.pop("toy-blobs")


def test_a_method_and_a_dataset_registered_in_a_test_train_evaluate_resume_and_print(toy_registry, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--dataset", "toy-blobs", "--ways", 3, "--shots", 2, "--meta-batch-size", 4, "--val-every", 0,
              "--meta-lr", 0.05, "--no-progress", "--run-dir", run_dir]
    code, out, err = run(["train", "toy-nearest-mean", *common, "--temperature", 2.0, "--print-config"], capsys)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["method"] == "toy-nearest-mean" and printed["method_config"] == {"temperature": 2.0, "width": 8}
    assert not run_dir.exists()  # a dry run writes nothing

    code, out, err = run(["train", "toy-nearest-mean", "--help"], capsys)
    assert code == 0 and "--temperature" in out and "divides the negative squared distances" in out

    code, out, err = run(["train", "toy-nearest-mean", *common, "--steps", 10, "--no-eval"], capsys)
    assert code == 0, err
    code, out, err = run(["train", "toy-nearest-mean", *common, "--steps", 60, "--eval-episodes", 200,
                          "--resume"], capsys)
    assert code == 0, err
    assert "resuming at step 10" in out
    # learning happened: far above the 33% of chance on 3-way tasks of noisy blobs
    assert json.loads((run_dir / "eval.json").read_text())["mean"] > 60

    # resumed at step 10 equals uninterrupted
    straight = tmp_path / "straight"
    code, out, err = run(["train", "toy-nearest-mean", *common[:-1], straight, "--steps", 60, "--no-eval"], capsys)
    assert code == 0, err
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)["learner"]
    uninterrupted = torch.load(straight / "checkpoint.pt", weights_only=True)["learner"]
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    code, out, err = run(["eval", run_dir, "--episodes", 50, "--no-progress"], capsys)
    assert code == 0 and "accuracy" in out, err

    # an option it does not have is refused as for any method
    code, out, err = run(["train", "toy-nearest-mean", *common, "--inner-lr", 0.1], capsys)
    assert code == 2 and "--inner-lr" in err


@pytest.fixture
def nearest_mean_example(toy_registry):
    """examples/nearest_mean.py imported (it registers ``nearest-mean``), and unregistered after."""
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "nearest_mean.py"
    yield runpy.run_path(str(example))["NearestMean"]
    METHODS.pop("nearest-mean")


def test_the_plugin_example_trains_starts_from_another_run_and_takes_a_batch_without_ways(nearest_mean_example,
                                                                                         tmp_path):
    """examples/nearest_mean.py keeps its network where ``--init-from`` copies it from
    (``network_attribute``), classifies a TaskBatch built without ``ways`` and refuses a malformed
    batch in ProtoNets' one line."""
    from metalearn.api import resolve_config
    from metalearn.training import build_trainer

    task = {"dataset": "toy-blobs", "ways": 3, "shots": 2}
    trained = build_trainer(resolve_config("nearest-mean", task=task, train={"steps": 3, "meta_batch_size": 2,
                                                                              "val_every": 0}), tmp_path / "a")
    trained.fit(progress=False)
    started = build_trainer(resolve_config("nearest-mean", task=task, train={"steps": 0, "init_from": str(
        tmp_path / "a")}), tmp_path / "b").learner
    for name, value in trained.learner.model.state_dict().items():
        torch.testing.assert_close(started.model.state_dict()[name], value, rtol=0, atol=0)

    batch = Blobs(3, 2, 2).sample(2, torch.Generator().manual_seed(0))
    without_ways = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    torch.testing.assert_close(started.predict(without_ways), started.predict(batch))
    with pytest.raises(MetalearnError, match=r"^nearest-mean: query_y has class ids \[3\] outside 0..2"):
        started.meta_loss(TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y.clamp(max=2) + 1,
                                    3))


def test_a_stop_of_a_run_of_a_method_registered_outside_a_plugin_says_how_to_go_on_from_python(toy_registry,
                                                                                                 tmp_path):
    """A method a notebook or a script registered is unknown to a fresh ``metalearn`` command: the
    hint after a stop is the Python call that goes on, and what the command line would need."""
    from metalearn.api import resolve_config, train
    from metalearn.errors import TrainingStopped

    config = resolve_config("toy-nearest-mean", task={"dataset": "toy-blobs", "ways": 3, "shots": 2},
                            train={"steps": 4, "meta_batch_size": 2, "val_every": 0})
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(config, run_dir=run_dir, stop_at=2, evaluate_after=False, progress=False)
    assert (f"continue from Python: metalearn.train(config, run_dir={str(run_dir)!r}, resume=True) (for the command "
            "line, the run's process registered it in") in str(stopped.value)
    assert "metalearn train toy-nearest-mean" not in str(stopped.value)
    # the run's status says the same: the Python lines, not commands that do not know the method
    from metalearn.api import run_status

    status = run_status(run_dir)
    assert status["state"] == "stopped" and status["own"] == []
    assert status["resume"].startswith(f"metalearn.train(config, run_dir={str(run_dir)!r}, resume=True) (for the "
                                       "command line, the run's process registered it in"), status["resume"]
    assert status["test"].startswith(f"metalearn.evaluate_run({str(run_dir)!r}) (for the command line"), status["test"]


def test_a_method_option_of_a_type_the_command_line_cannot_carry_is_refused_at_registration():
    from metalearn.options import option, options

    @options
    class Blocks(NearestMeanConfig):
        feature_blocks: tuple[int, ...] = option((3, 4), "the blocks whose features are joined")

    with pytest.raises(MetalearnError, match=r"Config's option feature_blocks is declared tuple\[int, \.\.\.\]: an "
                                             r"option is a bool, int, float or str \(or one of them or None\); give a "
                                             r"list as a str of comma-separated values"):
        register_method(type("Blocky", (NearestMean,), {"name": "toy-blocky", "Config": Blocks}))
    assert "toy-blocky" not in METHODS


def test_a_registered_method_refuses_bad_values_naming_its_field(toy_registry):
    from metalearn.algorithms import make_method_config
    from metalearn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^NearestMean.Config.width must be int, got 'wide'$"):
        make_method_config("toy-nearest-mean", {"width": "wide"})


def test_a_registered_dataset_refuses_an_option_for_its_reason(toy_registry, capsys):
    """A dataset's ``reasons`` say why an option does not apply; an option without one is
    refused for the dataset's kind; both in one line."""
    code, out, err = run(["train", "toy-nearest-mean", "--dataset", "toy-blobs", "--image-size", 16], capsys)
    assert code == 2 and err == ("error: --image-size does not apply to toy-blobs: its points are 6 numbers, not "
                                 "images\n"), err
    code, out, err = run(["train", "toy-nearest-mean", "--dataset", "toy-blobs", "--image-size", 16, "--noise-std",
                          0.1], capsys)
    assert code == 2 and err == ("error: --noise-std does not apply to toy-blobs, a classification dataset; "
                                 "--image-size does not apply either: its points are 6 numbers, not images\n"), err


def test_a_dataset_whose_problem_gives_another_shape_than_it_draws_is_named(toy_registry, tmp_path, capsys):
    """A registered dataset's problem(task) sizes the network; where its task source draws examples
    of another shape, the refusal says so, not only what the network's layer said."""
    register_dataset(Dataset("toy-blobs-5", True, build=lambda task, shape, part, data_dir, progress: Blobs(
        shape.ways, shape.shots, shape.query), problem=lambda task: Problem((5,), task.ways, True),
        inapplicable=("noise_std", "image_size")))
    try:
        code, _, err = run(["train", "maml", "--dataset", "toy-blobs-5", "--model", "mlp", "--ways", 3, "--steps", 1,
                            "--meta-batch-size", 2, "--no-eval", "--val-every", 0, "--no-progress",
                            "--run-dir", tmp_path / "run"], capsys)
    finally:
        DATASETS.pop("toy-blobs-5")
    assert code == 2 and err.endswith("error: maml: the tasks' inputs have shape (6,) per example, but the network "
                                      "was built for (5,) (for a dataset of your own: its problem(task) gives the "
                                      "shape of the examples its task source draws)\n"), err


@pytest.mark.parametrize("method", ["protonet", "matchingnet", "maml"])
def test_built_in_methods_learn_tasks_of_vectors_with_the_vector_network_by_default(toy_registry, tmp_path, capsys,
                                                                                  method):
    """A dataset of vectors (features extracted beforehand, tabular data) gets mlp, the built-in
    network for vectors, where the method's default network takes images; a network named is
    kept. The methods learn the blobs: 3-way chance is 33%."""
    run_dir = tmp_path / method
    code, _, err = run(["train", method, "--dataset", "toy-blobs", "--ways", 3, "--shots", 2, "--steps", 100,
                        "--meta-batch-size", 4, "--eval-episodes", 100, "--val-every", 0, "--no-progress",
                        "--run-dir", run_dir], capsys)
    assert code == 0, err
    assert json.loads((run_dir / "config.json").read_text())["method_config"]["model"] == "mlp"
    assert json.loads((run_dir / "eval.json").read_text())["mean"] > 50
    code, _, err = run(["train", method, "--dataset", "toy-blobs", "--model", "conv4", "--print-config"], capsys)
    assert code == 2 and "conv4" in err and "image" in err, err  # named: kept, and refused for these inputs


def test_the_vector_network_embeds_without_its_output_layer():
    from metalearn.models import build_model

    net = build_model("mlp", (6,), None)
    assert net(torch.zeros(4, 6)).shape == (4, 40) and not isinstance(net.net[-1], nn.Linear)
    assert build_model("mlp", (6,), 3)(torch.zeros(4, 6)).shape == (4, 3)


def test_register_method_refuses_what_is_not_a_method():
    with pytest.raises(MetalearnError, match="not a MetaLearner subclass"):
        register_method(dict)

    @dataclass(frozen=True)
    class Empty:
        pass

    class Nameless(MetaLearner):
        Config = Empty
        build = meta_loss = predict = lambda *args: None

    before = dict(METHODS)
    for name in (None, "", 5, "my method", "Upper"):
        Nameless.name = name
        with pytest.raises(MetalearnError, match=f"Nameless.name must be the method's command-line name.*got {name!r}"):
            register_method(Nameless)

    class Idle(MetaLearner):
        name, Config = "idle", Empty

        def predict(self, batch):
            return batch.query_x

    with pytest.raises(MetalearnError, match="Idle does not define build, meta_loss: a method builds itself"):
        register_method(Idle)

    @dataclass(frozen=True)
    class NoDefault:
        lr: float

    class Undefaulted(MetaLearner):
        name, Config = "undefaulted", NoDefault
        build = meta_loss = predict = lambda *args: None

    with pytest.raises(MetalearnError, match="Undefaulted.Config's option\\(s\\) lr have no default"):
        register_method(Undefaulted)
    assert METHODS == before  # nothing registered, and sorting the names still works
    assert sorted(METHODS)


def test_build_learner_takes_a_config_object_or_none_and_names_what_else_it_takes():
    from metalearn.algorithms import MAML, build_learner

    problem = Problem((1,), 1, False)
    config = MAML.Config(inner_lr=0.01, model="mlp")
    assert build_learner("maml", config, problem).config == config
    assert build_learner("maml", None, Problem((1, 28, 28), 5, True)).config == MAML.Config()
    with pytest.raises(MetalearnError, match="build_learner takes the options as a dict \\(or a MAMLConfig\\), got list"):
        build_learner("maml", [("inner_lr", 0.1)], problem)
    with pytest.raises(MetalearnError, match="build_learner takes a Problem .*got tuple"):
        build_learner("maml", {}, ((1,), 1, False))


def test_method_constructors_take_their_config_or_a_dict_of_options_and_name_what_else():
    """MAML(model, {"inner_steps": 2}) builds MAML.Config from the dict (type-checked); a
    misspelt option or a config of another type is one MetalearnError naming it, before the
    constructor reads an option (PLATIPUS reads one first), for every built-in method."""
    from metalearn.algorithms import MAML, PLATIPUS, MemoryModule, NeuralStatistician, ProtoNet

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert MAML(model, {"inner_steps": 2}).config == MAML.Config(inner_steps=2)
    assert MAML(model, config={"inner_steps": 2}).config.inner_steps == 2
    assert ProtoNet(model).config == ProtoNet.Config()
    with pytest.raises(ConfigError, match=r"^MAML\.Config\.inner_steps must be int, got '2'$"):  # as MAML names it
        MAML(model, {"inner_steps": "2"})
    with pytest.raises(MetalearnError, match="MAML has no option\\(s\\) inner_step; known: "):
        MAML(model, {"inner_step": 2})
    for build, name in ((lambda c: PLATIPUS(model, c), "PLATIPUSConfig"), (lambda c: NeuralStatistician(c),
                        "StatisticianConfig"), (lambda c: MemoryModule(model, 3, config=c), "MemoryConfig")):
        with pytest.raises(MetalearnError, match=f"takes its options as a {name} \\(or a dict of them\\), got str"):
            build("first_order")
    class Defaulted(ProtoNet):  # the usual `config=None` of a constructor: None reaches it
        def __init__(self, model, config=None):
            super().__init__(model, config or ProtoNet.Config())

    assert Defaulted(model, None).config == ProtoNet.Config()

    class Wider(MAML):  # a subclass with a Config of its own that passes its parent's to MAML's constructor
        @options
        class Config:
            width: int = option(2, "")

        def __init__(self, model, config=None):
            super().__init__(model, MAML.Config(inner_steps=3))
            self.wide = config

    assert Wider(model, {"width": 4}).wide == Wider.Config(width=4)
    assert Wider(model).config == MAML.Config(inner_steps=3)
    for cls in METHODS.values():  # every method's constructor that takes a config is checked
        init = cls.__dict__.get("__init__")
        if init is not None and "config" in inspect.signature(init).parameters:  # (the signature: the original's)
            assert hasattr(init, "__wrapped__"), cls


def test_no_method_option_shares_a_flag_with_a_task_or_training_option():
    from metalearn.algorithms import check_option_names

    for cls in METHODS.values():
        check_option_names(cls)

    @dataclass(frozen=True)
    class Clashing:
        steps: int = option(3, "a method option named like the training length")

    class Clash(NearestMean):
        name = "toy-clash"
        Config = Clashing

    with pytest.raises(MetalearnError, match="share a flag: steps"):
        register_method(Clash)



def test_legacy_defaults_name_real_options_with_valid_values():
    """MetaLearner.legacy_defaults fill stored configurations (RunConfig.from_dict): every entry
    must be an option of the method's Config that the Config accepts, checked at registration."""
    from metalearn.algorithms import check_legacy_defaults

    for cls in METHODS.values():
        check_legacy_defaults(cls)

    class Misspelt(NearestMean):
        name = "toy-misspelt"
        legacy_defaults = {"widht": 3}

    with pytest.raises(MetalearnError, match="legacy_defaults names option.*widht"):
        register_method(Misspelt)
    assert "toy-misspelt" not in METHODS


@pytest.mark.parametrize("method", sorted(name for name, cls in METHODS.items() if cls.classification_only))
def test_a_classification_method_on_regression_tasks_names_the_datasets_it_takes(method, capsys):
    """Refused when the run is configured (the classification datasets named from the registry),
    and by the method's build for a regression Problem given in Python."""
    code, out, err = run(["train", method, "--dataset", "sinusoid", "--steps", 1], capsys)
    assert code == 2 and err.strip() == (f"error: --dataset 'sinusoid' is a regression dataset; {method} is a "
                                         "classification method: use omniglot, folder, mini-imagenet")
    with pytest.raises(MetalearnError, match=f"^{method} is a classification method: it needs tasks of classes"):
        METHODS[method].build(METHODS[method].Config(), Problem((1,), 1, False))


def config_classes():
    from metalearn.config import TaskConfig, TrainConfig

    return [TaskConfig, TrainConfig] + [cls.Config for cls in METHODS.values()]


@pytest.mark.parametrize("config_class", config_classes(), ids=lambda c: c.__name__)
def test_every_option_is_checked_against_its_declared_type(config_class):
    """A Config built in Python refuses a value of the wrong type by name before any check
    compares it: first_order="false" was a true value (first-order MAML without a word),
    steps=2.5 trained 3 steps, ways="5" failed inside a comparison. A bool is no count or rate."""
    import typing

    hints = typing.get_type_hints(config_class)
    checked = 0
    if config_class.__name__ not in ("TaskConfig", "TrainConfig"):  # a method's: named as its own checks name it
        assert getattr(config_class, "owner_name", "").endswith(".Config"), config_class
    for field in dataclasses.fields(config_class):
        allowed = set(typing.get_args(hints[field.name])) or {hints[field.name]}
        if not allowed <= {bool, int, float, str, type(None)}:
            continue
        wrong = [[1]] + ([True] if bool not in allowed else ["false"])
        for value in wrong:
            owner = getattr(config_class, "owner_name", config_class.__name__)  # MAML.Config, TaskConfig
            with pytest.raises(ConfigError, match=rf"^{re.escape(owner)}\.{field.name} must be "):
                config_class(**{field.name: value})
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("shape, output_dim, classification, message", [
    ((1, 28, 28), 0, True, "classes per task \\(at least 2\\), got 0"),
    ((1, 28, 28), -1, True, "classes per task \\(at least 2\\), got -1"),
    ((1,), 0, False, "the target's size \\(at least 1\\), got 0"),
    ((1.5, 28, 28), 5, True, "sizes of at least 1 \\(e.g. \\(1, 28, 28\\)\\), got \\(1.5, 28, 28\\)"),
    ((1, 0, 28), 5, True, "got \\(1, 0, 28\\)"),
])
def test_a_problem_no_network_can_be_built_for_is_refused(shape, output_dim, classification, message):
    with pytest.raises(MetalearnError, match=f"^Problem.(input_shape|output_dim) is .*{message}"):
        Problem(shape, output_dim, classification)


def test_a_problem_takes_a_list_or_numpy_sizes_as_its_tuple():
    import numpy as np

    assert Problem([1, np.int64(28), 28], 5, True).input_shape == (1, 28, 28)


def test_every_built_in_method_registers_again_as_it_is():
    """register_method's checks take every built-in method (maml-rl scores its episodes instead
    of predicting labels), so a second registration replaces one as documented."""
    before = dict(METHODS)
    for cls in before.values():
        assert register_method(cls) is cls
    assert METHODS == before


def test_options_take_numpy_numbers_as_python_ones_and_a_subclass_keeps_its_parents_checks():
    import numpy as np

    from metalearn.algorithms import MAML
    from metalearn.options import option, options

    config = MAML.Config(inner_steps=np.int64(5), inner_lr=np.float32(0.5))
    assert type(config.inner_steps) is int and type(config.inner_lr) is float and config.inner_steps == 5
    assert json.dumps(dataclasses.asdict(config))  # as config.json saves it

    @options
    class Base:
        x: int = option(1, "x")

        def __post_init__(self):
            if self.x < 0:
                raise ConfigError("Base", "x", f"must be >= 0, got {self.x}")

    @options
    class Sub(Base):
        y: int = option(2, "y")

    with pytest.raises(ConfigError, match="x must be >= 0"):
        Sub(x=-1)
    with pytest.raises(ConfigError, match="Sub.y must be int"):
        Sub(y="2")


def test_paper_defaults_written_with_the_task_alone_still_apply(toy_registry):
    """``paper_defaults(task, given)`` gained ``given`` (the options the user set); a method
    written with ``paper_defaults(cls, task)`` is called as it was written."""
    from metalearn.api import resolve_config

    class OldStyle(NearestMean):
        name = "toy-old-style"

        @classmethod
        def paper_defaults(cls, task):
            return {"width": 4}, {"steps": 7}

    class NewStyle(NearestMean):
        name = "toy-new-style"

        @classmethod
        def paper_defaults(cls, task, given=None):
            return {"width": 16 if (given or {}).get("temperature") == 2.0 else 4}, {"steps": 7}

    for method in (OldStyle, NewStyle):
        register_method(method)
    try:
        old = resolve_config("toy-old-style", {"dataset": "toy-blobs"})
        assert (old.method_config["width"], old.train.steps) == (4, 7)
        new = resolve_config("toy-new-style", {"dataset": "toy-blobs"}, {"temperature": 2.0})
        assert new.method_config["width"] == 16
    finally:
        METHODS.pop("toy-old-style")
        METHODS.pop("toy-new-style")


def test_abilities_are_told_by_the_methods_a_class_defines_and_messages_list_the_registry(toy_registry):
    """The commands ask what a method can do (ABILITIES), never its name: a method of your own
    with a helper that happens to be called ``sample`` is no generative method, and the
    messages that name the methods with an ability list the registry's."""
    from metalearn.algorithms import can, methods_that

    assert [name for name in METHODS if can(name, "samples models")] == ["platipus"]
    assert [name for name in METHODS if can(name, "draws images")] == ["statistician"]

    class WithHelper(NearestMean):
        name = "toy-with-helper"

        def sample(self, n):  # a helper of its own, not a generator of images
            return n

    class Drawing(NearestMean):
        name = "toy-drawing"

        def sample(self, support_images, num=20, generator=None):
            return support_images

        @staticmethod
        def support_sets(batch):
            return batch.support_x

    assert not can(WithHelper, "draws images") and can(Drawing(Problem((6,), 2, True), NearestMeanConfig()),
                                                        "draws images")
    register_method(Drawing)
    try:
        assert methods_that("draws images") == "statistician, toy-drawing"
    finally:
        METHODS.pop(Drawing.name)


def test_a_dataset_of_photographs_gets_the_methods_photograph_settings_by_its_declaration(monkeypatch):
    """Paper defaults follow what a dataset declares (Dataset.photographs), not its name: a plugin's
    photographs get MAML's and ProtoNets' mini-ImageNet settings, as --dataset folder does."""
    from metalearn.api import resolve_config
    from metalearn.datasets import of_photographs, reads_image_folder

    omniglot = DATASETS["omniglot"]
    monkeypatch.setitem(DATASETS, "photos", dataclasses.replace(omniglot, name="photos", photographs=True))
    monkeypatch.setitem(DATASETS, "drawings", dataclasses.replace(omniglot, name="drawings"))
    assert of_photographs("photos") and of_photographs("folder") and not of_photographs("drawings")
    assert reads_image_folder("mini-imagenet") and not reads_image_folder("photos") and not of_photographs("nope")
    for name, model, inner_lr in (("photos", "conv4-maxpool-32", 0.01), ("drawings", "conv4", 0.4)):
        config = resolve_config("maml", task={"dataset": name, "ways": 5, "shots": 1})
        assert (config.method_config["model"], config.method_config["inner_lr"]) == (model, inner_lr), name
    assert resolve_config("protonet", task={"dataset": "photos"}).method_config["model"] == "conv4-flat"


class LinearTasks:
    """Regression tasks y = w . x on 12 numbers, w ~ N(0, I) per task: inputs that are not one
    number, and no true function on the class."""

    def __init__(self, shots: int, query: int):
        self.shots, self.query = shots, query

    def sample(self, num_tasks, generator, tasks=None):
        n = self.shots + self.query
        w = torch.randn(num_tasks, 12, 1, generator=generator)
        x = torch.randn(num_tasks, n, 12, generator=generator)
        y = x @ w
        batch = TaskBatch(x[:, :self.shots], y[:, :self.shots], x[:, self.shots:], y[:, self.shots:],
                          task_params={"w": w[..., 0]})
        return batch if tasks is None else batch.select(tasks)


@pytest.fixture
def linear_tasks():
    register_dataset(Dataset("toy-linear", False, build=lambda task, shape, part, data_dir, progress: LinearTasks(
        shape.shots, shape.query), problem=lambda task: Problem((12,), 1, False), defaults={"shots": 10, "query": 10},
        generated=True, inapplicable=("image_size",)))
    yield
    DATASETS.pop("toy-linear")


def test_a_registered_regression_dataset_refuses_classes_and_plots_without_a_true_function(linear_tasks, tmp_path,
                                                                                           capsys):
    """A regression dataset of one's own takes no --ways or --split (as sinusoid), records none;
    its runs of 12-number inputs, whose source tells no true function, get their learning
    curves from plot and export with one warning line, not a traceback from the fits figure."""
    run_dir = tmp_path / "run"
    common = ["--dataset", "toy-linear", "--run-dir", run_dir, "--no-progress"]
    for extra, named in ((["--ways", 3], "--ways does not apply to toy-linear, a regression dataset"),
                         (["--split", "vinyals"], "--split does not apply to toy-linear, a regression dataset")):
        code, out, err = run(["train", "maml", *common, *extra, "--print-config"], capsys)
        assert code == 2 and err.count("\n") == 1 and named in err, err
    code, out, err = run(["train", "maml", *common, "--print-config"], capsys)
    assert code == 0, err
    assert json.loads(out)["task"]["ways"] == 0 and json.loads(out)["task"]["split"] == "none"
    # a dataset that lists split as inapplicable itself records none either, not the default maml
    listed = Dataset("toy-listed", False, build=lambda *a: None, problem=lambda task: Problem((12,), 1, False),
                     inapplicable=("split",))
    assert listed.fixed == {"split": "none", "ways": 0} and listed.inapplicable.count("split") == 1

    code, out, err = run(["train", "maml", *common, "--steps", 4, "--meta-batch-size", 2, "--val-every", 0,
                          "--eval-episodes", 4], capsys)
    assert code == 0, err
    code, out, err = run(["plot", run_dir], capsys)
    assert code == 0 and "warning: toy-linear's task source tells no true function" in err, err
    assert (run_dir / "plots" / "learning_curves.png").is_file() and not (run_dir / "plots" / "fits.png").exists()
    code, out, err = run(["export", run_dir, tmp_path / "record"], capsys)
    assert code == 0 and (tmp_path / "record" / "learning_curves.png").is_file(), err
