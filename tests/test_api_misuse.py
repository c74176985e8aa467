"""The Python API's refusals of what a caller may get wrong: each is one line that names what
was given and what is wanted, never a TypeError or AttributeError from inside torch or the
library. None of these tests needs Omniglot."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from batches import image_batch
from metalearn.algorithms import MAML, MatchingNet, ProtoNet, build_learner
from metalearn.algorithms.base import device_mismatch
from metalearn.data.splits import ClassPool
from metalearn.errors import MetalearnError, keyword_only_after
from metalearn.evaluation import evaluate
from metalearn.models import MLP, Conv4
from metalearn.tasks import EpisodeSampler, Problem, SinusoidTasks, TaskBatch, require_task_source

pytestmark = pytest.mark.usefixtures("one_thread")


def refusal(call) -> str:
    """The message of the MetalearnError ``call()`` raises, checked to be one line."""
    with pytest.raises(MetalearnError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- TaskBatch -------------------------------------------------------------------------------


def test_a_task_batch_of_numpy_arrays_is_refused_before_torch_reads_it():
    batch = image_batch(tasks=1, ways=5, shots=1, query=1, dtype=torch.float32)
    arrays = (batch.support_x.numpy(), batch.support_y.numpy(), batch.query_x.numpy(), batch.query_y.numpy())
    assert refusal(lambda: TaskBatch(*arrays, ways=5)) == (
        "TaskBatch's support_x is a numpy.ndarray; a TaskBatch holds tensors (torch.as_tensor(...), or "
        "torch.from_numpy(...) for a NumPy array)")
    message = refusal(lambda: TaskBatch(batch.support_x, [0, 1, 2, 3, 4], batch.query_x, batch.query_y, ways=5))
    assert message.startswith("TaskBatch's support_y is a list; a TaskBatch holds tensors")


# -- task sources ----------------------------------------------------------------------------


class WithoutTasks:
    def sample(self, num_tasks, generator):
        return SinusoidTasks().sample(num_tasks, generator)


class ReturnsTuple:
    def sample(self, num_tasks, generator, tasks=None):
        batch = SinusoidTasks().sample(num_tasks, generator, tasks)
        return batch.support_x, batch.support_y, batch.query_x, batch.query_y


class TakesKeywords:
    def sample(self, num_tasks, generator, **options):
        return SinusoidTasks().sample(num_tasks, generator, **options)


SOURCE = ("a task source is an object with sample(num_tasks, generator, tasks=None) returning a TaskBatch (for "
          "tensors of images: metalearn.EpisodeSampler; see docs/data.md, 'Your own tasks')")


def test_evaluate_refuses_what_is_not_a_task_source_before_drawing():
    learner = MAML(MLP(1, 1))
    batch = SinusoidTasks().sample(2, torch.Generator().manual_seed(0))
    for source, said in (([batch], "an iterable (list), which yields batches but cannot draw them from a seed"),
                         ((b for b in [batch]), "an iterable (generator)"),
                         (torch.utils.data.DataLoader([batch]),
                          "an iterable (torch.utils.data.dataloader.DataLoader)"),
                         (batch, "a TaskBatch, one batch already drawn"),
                         (SinusoidTasks, "the class SinusoidTasks, not an object of it: create one (SinusoidTasks(...))"),
                         (3, "of type int")):
        message = refusal(lambda: evaluate(learner, source, episodes=2))
        assert message.startswith(f"evaluate's source is {said}") and message.endswith(SOURCE), message
    assert refusal(lambda: evaluate(learner, WithoutTasks(), episodes=2)) == (
        "evaluate's source's sample(num_tasks, generator) must take (num_tasks, generator, tasks=None): tasks, passed "
        "by keyword, is the slice of the batch a distributed rank keeps (None: all of it; batch.select(tasks) cuts it "
        "from the whole batch, drawn as without it)")
    assert refusal(lambda: evaluate(learner, ReturnsTuple(), episodes=2)) == (
        f"evaluate's source ({__name__}.ReturnsTuple): its sample returned a tuple; it must return a TaskBatch: give "
        "the tensors as TaskBatch(support_x, support_y, query_x, query_y, ways=N) (ways=0 for regression)")
    assert evaluate(learner, TakesKeywords(), episodes=2)["episodes"] == 2  # **options take tasks=


def test_the_trainer_refuses_what_is_not_a_task_source_before_writing(tmp_path):
    from metalearn import Trainer, resolve_config

    config = resolve_config("maml", task={"dataset": "sinusoid"}, train={"steps": 1, "meta_batch_size": 2,
                                                                          "val_every": 0})
    batch = SinusoidTasks().sample(2, torch.Generator().manual_seed(0))
    assert refusal(lambda: Trainer(config, MAML(MLP()), [batch], None, tmp_path / "a")).startswith(
        "Trainer's train_tasks is an iterable (list)")
    assert refusal(lambda: Trainer(config, MAML(MLP()), SinusoidTasks(), WithoutTasks(), tmp_path / "a")).startswith(
        "Trainer's val_tasks's sample(num_tasks, generator) must take (num_tasks, generator, tasks=None)")
    trainer = Trainer(config, MAML(MLP()), ReturnsTuple(), None, tmp_path / "b")
    assert refusal(lambda: trainer.fit(progress=False)).startswith(
        f"Trainer's train_tasks ({__name__}.ReturnsTuple): its sample returned a tuple")
    assert not (tmp_path / "a").exists()


def test_require_task_source_takes_the_library_sources_and_names_the_role():
    require_task_source(SinusoidTasks(), "Trainer's train_tasks")
    require_task_source(TakesKeywords(), "Trainer's train_tasks")
    message = refusal(lambda: require_task_source([], "Trainer's train_tasks"))
    assert message.startswith("Trainer's train_tasks is an iterable (list)")


# -- EpisodeSampler --------------------------------------------------------------------------


def test_episode_sampler_refuses_a_pool_that_is_not_a_class_pool():
    images = torch.randint(0, 255, (6, 4, 8, 8), dtype=torch.uint8)
    for pool, kind in (([0, 1, 2], "list"), (torch.arange(6), "Tensor"), (None, "NoneType")):
        message = refusal(lambda: EpisodeSampler(images, pool, 2, 1, 1))
        assert message.startswith(f"EpisodeSampler's pool must be a ClassPool (metalearn.data.splits), the classes to "
                                  f"draw from, got {kind}: ClassPool(\"mine\", torch.arange(n), "
                                  "torch.zeros(n, dtype=torch.long)) draws from classes 0..n-1"), message
    pool = ClassPool("mine", torch.arange(6), torch.zeros(6, dtype=torch.long))  # what the message says works
    assert EpisodeSampler(images, pool, 2, 1, 1).sample(2, torch.Generator().manual_seed(0)).num_tasks == 2


def test_episode_sampler_says_a_numpy_array_is_not_a_tensor_and_words_shapes_as_arguments():
    images = torch.randint(0, 255, (6, 4, 8, 8), dtype=torch.uint8)
    pool = ClassPool("mine", torch.arange(6), torch.zeros(6, dtype=torch.long))
    assert refusal(lambda: EpisodeSampler(images.numpy(), pool, 2, 1, 1)) == (
        "EpisodeSampler takes images as a torch tensor, got a numpy.ndarray uint8 (6, 4, 8, 8); give "
        "torch.from_numpy(images) for a NumPy array (uint8, (classes, examples, [C,] H, W))")
    # called from Python: its arguments, not the command line's options
    assert refusal(lambda: EpisodeSampler(images, pool, 7, 1, 1)) == (
        "your data split mine has 6 classes; ways=7 is more than that. Lower ways or use a pool with more classes.")
    assert refusal(lambda: EpisodeSampler(images, pool, 2, 3, 2)) == (
        "your data has 4 images per class; shots=3 with query=2 needs 5. Lower shots or query.")
    assert refusal(lambda: EpisodeSampler(images, pool, 1, 1, 1)) == "ways must be at least 2, got 1"
    # a run's sampler (build_task_source passes test=False or True): the options that set the shape,
    # from Python as the TaskConfig's fields, on the command line (with_flags) as its flags
    for test, python, command_line in (
            (False, "ways=7 is more than that. Lower ways or", "--ways 7 is more than that. Lower --ways or"),
            (True, "test_ways=7 (it defaults to ways) is more than that. Lower test_ways (in evaluate_run: "
                   "episode_shape's ways) or",
             "--test-ways 7 (it defaults to --ways) is more than that. Lower --test-ways (in metalearn eval and "
             "compare: --ways) or")):
        with pytest.raises(MetalearnError) as info:
            EpisodeSampler(images, pool, 7, 1, 1, test=test, ways_follow=True)
        assert python in str(info.value) and "--" not in str(info.value), str(info.value)
        assert command_line in info.value.with_flags(), info.value.with_flags()


# -- embedding methods: class ids 0..N-1 -----------------------------------------------------


@pytest.mark.parametrize("learner", [ProtoNet(Conv4(1, None, hidden=8)), MatchingNet(Conv4(1, None, hidden=8))],
                         ids=["protonet", "matchingnet"])
def test_labels_from_one_without_ways_name_the_class_without_examples(learner):
    batch = image_batch(tasks=2, ways=5, shots=1, query=1, dtype=torch.float32)
    from_one = TaskBatch(batch.support_x, batch.support_y + 1, batch.query_x, batch.query_y + 1)  # 1..5, no ways
    assert refusal(lambda: learner.predict(from_one)) == (
        f"{learner.name}: a task has a class without support examples; every class needs at least one shot: task 0's "
        "support_y has no class 0 (it has [1, 2, 3, 4, 5]); class ids run 0..N-1 for N-way tasks, and without "
        "TaskBatch(..., ways=N) the largest support label, 5, makes them 6-way: label each task's classes 0..N-1")
    support_y = batch.support_y.clone()
    support_y[1, 3] = 0  # task 1 loses its one example of class 3
    missing = TaskBatch(batch.support_x, support_y, batch.query_x, batch.query_y, ways=5)
    assert refusal(lambda: learner.predict(missing)).endswith(
        "task 1's support_y has no class 3 (it has [0, 1, 2, 4]); the tasks being 5-way (class ids 0..4)")


# -- networks --------------------------------------------------------------------------------


def test_a_trained_fixed_ways_learner_names_its_ways_in_predict_as_in_fit_predict():
    learner = build_learner("maml", {}, Problem((1, 16, 16), 5, True))  # as load_trained builds it
    batch = image_batch(tasks=1, ways=20, shots=1, query=1, dtype=torch.float32)
    said = ("maml was trained for 5-way tasks (one output per class) and cannot classify 20 classes: give it 5 "
            "classes, or use a method without a per-class output layer (protonet, matchingnet, memory, statistician)")
    assert refusal(lambda: learner.predict(batch)) == said
    assert refusal(lambda: learner.fit_predict(batch.support_x[0], batch.support_y[0], batch.query_x[0])) == said
    # a network of one's own, not yet trained: how to build one that fits
    assert "it needs one output per class (e.g. Conv4(in_channels, 20)" in refusal(
        lambda: MAML(Conv4(1, 5)).predict(batch))


class TupleOut(nn.Module):
    def __init__(self, outputs):
        super().__init__()
        self.net = Conv4(1, outputs, hidden=8)

    def forward(self, x):
        return self.net(x), None


def test_a_network_returning_a_tuple_is_refused():
    batch = image_batch(tasks=1, ways=5, shots=1, query=1, dtype=torch.float32)
    for learner in (MAML(TupleOut(5)), ProtoNet(TupleOut(None))):
        assert refusal(lambda: learner.predict(batch)) == (
            f"{learner.name}: the network's forward returned a tuple; it must return one tensor of outputs, "
            "(examples, *output_shape) (return the logits alone)")


def test_the_network_must_be_a_module_instance():
    assert refusal(lambda: MAML(Conv4)) == ("MAML: the network must be an nn.Module instance (got the class Conv4: "
                                            "call it, Conv4(...))")
    assert refusal(lambda: MAML(lambda x: x)).startswith(
        "MAML: the network must be an nn.Module instance (got the function <lambda>: wrap its computation in an "
        "nn.Module")
    assert refusal(lambda: ProtoNet(None)) == "protonet: the network must be an nn.Module instance (got None)"


def test_a_network_on_another_device_than_the_batch_is_named_as_such():
    """The meta device stands for a GPU: its tensors meet the CPU's as a CUDA tensor would."""
    batch = image_batch(tasks=1, ways=5, shots=1, query=1, dtype=torch.float32)
    for learner in (MAML(Conv4(1, 5, hidden=8)), ProtoNet(Conv4(1, None, hidden=8))):
        learner.predict(batch)  # checked once on the CPU: moving it must check again
        learner.to("meta")
        assert refusal(lambda: learner.predict(batch)) == (
            f"{learner.name}: the network is on device meta and the batch on cpu; move one to the other's device "
            "(batch.to(\"meta\") or learner.to(\"cpu\"))")
    assert refusal(lambda: evaluate(MAML(MLP(1, 1)).to("meta"), SinusoidTasks(), episodes=2)).startswith(
        "evaluate: the learner's parameters are on the meta device, which holds no values")


def test_device_mismatch_reads_torchs_words():
    cuda = RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                        "cuda:0 and cpu!")
    message = str(device_mismatch("maml", cuda, torch.device("cuda:0"), torch.device("cpu")))
    assert message == ("maml: the network is on device cuda:0 and the batch on cpu; move one to the other's device "
                       "(batch.to(\"cuda:0\") or learner.to(\"cpu\"))")
    unknown = str(device_mismatch("mine", cuda, None, torch.device("cuda:0")))
    assert unknown.startswith("mine: the batch is on device cuda:0, where the learner's first parameter is, but part "
                              "of the learner is on another")
    assert device_mismatch("maml", RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None,
                           torch.device("cpu")) is None


# -- paths, configs and run folders ------------------------------------------------------------


def test_what_a_caller_gets_wrong_about_runs_and_configs_is_one_line(tmp_path):
    """A run to resume that is not there is refused where the config is resolved, not replaced
    by a new run's defaults; a folder split two ways, a learner that is not one, a one-class
    support set and a trainer's own lock met again are named as such."""
    from metalearn.api import build_trainer, resolve_config, train
    from metalearn.config import TaskConfig
    from metalearn.locking import FolderInUse

    assert refusal(lambda: resolve_config(ProtoNet)) == (
        "a method is named by its text name: give 'protonet', not the class ProtoNet")
    assert refusal(lambda: resolve_config("maml", task={"dataset": [5]})).startswith(  # not "unhashable type"
        "TaskConfig.dataset must be one of omniglot, folder, mini-imagenet, sinusoid, sine-or-line, got [5] (")
    assert refusal(lambda: build_learner("maml", {}, Problem((1, 28, 28), 2**63 - 1, True))) == (  # torch's overflow
        "maml's network is too large to build (Storage size calculation overflowed with sizes=[9223372036854775807, "
        "64]): give smaller sizes (of its input, its output, its layers or its memory)")
    assert refusal(lambda: resolve_config("maml", resume_from=tmp_path / "typo")) == (
        f"cannot resume: {tmp_path / 'typo'} holds no run (no config.json)")
    assert refusal(lambda: TaskConfig(dataset="folder", split_fractions="0.5,0,0.5", split_file="s.json")) == (
        "TaskConfig.split_fractions, TaskConfig.split_file both split the classes; give one of them")
    tasks = SinusoidTasks()
    assert refusal(lambda: evaluate("maml", tasks, episodes=2)).startswith(
        "evaluate's learner is a MetaLearner (e.g. metalearn.load_trained(run_dir)[1]) or an object with predict, "
        "got str 'maml'")
    protonet = ProtoNet(Conv4(in_channels=1, hidden=8))
    images = torch.rand(3, 1, 28, 28)
    assert refusal(lambda: protonet.fit_predict(images[:1], [0], images[1:])) == (
        "support images of at least 2 classes are needed to tell classes apart, got 1 class")
    config = resolve_config("maml", task={"dataset": "sinusoid"}, train={"steps": 1, "val_every": 0})
    held = build_trainer(config, tmp_path / "run")  # holds the folder's lock until fitted or released
    with pytest.raises(FolderInUse, match=r"in use by this process \(\d+\), through a lock it holds elsewhere \(a "
                                          r"Trainer not yet fitted: call its release\(\), or build it with lock=False\)"):
        train(config, tmp_path / "run", progress=False, announce=None)
    held.release()
    train(config, tmp_path / "run", progress=False, announce=None, evaluate_after=False)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_numpy_numbers_are_taken_as_python_s_throughout_a_notebook_s_run(tmp_path):
    """What arithmetic on arrays gives (np.int64) reaches every option as Python's number: method
    options, steps, stop_at, episodes, seeds, episode shapes and overrides; the evaluation file is
    written (JSON) and named as for Python's ints."""
    import json

    import numpy as np

    from metalearn.api import evaluate_run, resolve_config, train
    from metalearn.errors import TrainingStopped
    from metalearn.uncertainty import compare_learners

    config = resolve_config("maml", task={"dataset": "sinusoid", "shots": 5},
                            method_config={"test_inner_steps": np.int64(2), "inner_lr": np.float32(0.01)},
                            train={"steps": np.int64(4), "meta_batch_size": 2, "val_every": 0})
    assert type(config.method_config["test_inner_steps"]) is int and type(config.method_config["inner_lr"]) is float
    with pytest.raises(TrainingStopped):
        train(config, run_dir=tmp_path / "run", evaluate_after=False, progress=False, stop_at=np.int64(2))
    train(config, run_dir=tmp_path / "run", resume=True, evaluate_after=False, progress=False)
    result = evaluate_run(tmp_path / "run", episodes=np.int64(5), seed=np.int64(1), progress=False,
                          episode_shape={"shots": np.int64(5)}, overrides={"test_inner_steps": np.int64(3)})
    written = tmp_path / "run" / "eval-episodes=5-seed=1-shots=5-test_inner_steps=3.json"
    assert json.loads(written.read_text())["mean"] == pytest.approx(result["mean"])
    compared = compare_learners({"a": tmp_path / "run"}, episodes=np.int64(4), seed=np.int64(2),
                                overrides={"test_inner_steps": np.int64(3)}, episode_shape={"shots": np.int64(5)})
    assert json.dumps(compared) and compared["episodes"] == 4


@pytest.mark.parametrize("seed", [1.5, "0", None, -1, True])
def test_evaluate_refuses_a_seed_that_is_no_whole_number_in_one_line(seed):
    source = SinusoidTasks(shots=5, query=5)
    message = refusal(lambda: evaluate(MAML(MLP(), MAML.Config(inner_lr=0.01)), source, 2, seed=seed))
    assert message == f"seed must be a whole number from 0 to {2**63 - 1}, got {seed!r}"


def test_a_float64_default_dtype_changes_neither_the_weights_nor_the_tasks(tmp_path):
    """A notebook's torch.set_default_dtype(torch.float64): learners are still built in float32 and
    the tasks drawn as under float32 (an image source's draws without a dtype too), so a run
    trains and scores as it would without it."""
    from metalearn.api import evaluate_run, resolve_config, train

    config = resolve_config("maml", task={"dataset": "sinusoid", "shots": 5},
                            train={"steps": 3, "meta_batch_size": 2, "val_every": 0})
    train(config, run_dir=tmp_path / "run", evaluate_after=False, progress=False)
    expected = evaluate_run(tmp_path / "run", episodes=6, progress=False)["mean"]
    images = torch.randint(0, 255, (30, 20, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sampler = EpisodeSampler(images, ClassPool("test", torch.arange(30), torch.zeros(30, dtype=torch.long)), 5, 1, 5)
    net = ProtoNet(Conv4(1, None, hidden=8, pooling="max"))
    scores = evaluate(net, sampler, 8, seed=3)["scores"]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert evaluate_run(tmp_path / "run", episodes=6, progress=False)["mean"] == expected
        learner = build_learner("protonet", None, Problem((1, 28, 28), 5, True))
        assert {p.dtype for p in learner.parameters()} == {torch.float32}
        assert SinusoidTasks().sample(2, torch.Generator().manual_seed(0)).support_x.dtype == torch.float32
        assert evaluate(net, sampler, 8, seed=3)["scores"] == scores
        assert torch.get_default_dtype() == torch.float64  # the caller's default as it was
    finally:
        torch.set_default_dtype(previous)


def test_runs_trained_in_threads_score_as_one_after_another_and_leave_the_caller_s_state(tmp_path):
    """A sweep's trials in a thread pool (Optuna's n_jobs): torch's random state and default
    dtype are the process's, so training holds them one thread at a time (PROCESS_STATE) and
    each run scores as it would alone; the caller's float64 default and random state stay as
    they were. Loading and evaluating a run draw nothing from the caller's random state."""
    from concurrent.futures import ThreadPoolExecutor

    from metalearn.api import evaluate_run, load_trained, resolve_config, train

    def trial(name: str, seed: int) -> float:
        config = resolve_config("platipus", task={"dataset": "sinusoid"},
                                train={"steps": 12, "val_every": 6, "eval_episodes": 10, "seed": seed})
        return train(config, tmp_path / name, progress=False, announce=None)[1]["mean"]

    alone = [trial(f"alone{seed}", seed) for seed in range(4)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    state = torch.get_rng_state()
    try:
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda seed: trial(f"threads{seed}", seed), range(4)))
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(previous)
    assert together == alone
    assert torch.equal(torch.get_rng_state(), state)
    load_trained(tmp_path / "alone0")
    evaluate_run(tmp_path / "alone0", episodes=4, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_warning_names_the_caller_s_line_and_is_shown_for_each_call(recwarn):
    """A notebook re-running a cell sees the warning again, at its own line, not at the library's
    (Python's default filter shows a warning once per place)."""
    import warnings

    from metalearn.api import resolve_config

    warnings.simplefilter("default")
    train = {"steps": 75000, "lr_halve_every": 2000}
    first = resolve_config("protonet", task={"dataset": "omniglot"}, train=train)
    again = resolve_config("protonet", task={"dataset": "omniglot"}, train=train)  # a cell run again: another line
    assert first == again
    places = [(w.filename, w.category.__name__) for w in recwarn if "halves the meta learning rate" in str(w.message)]
    assert places == [(__file__, "OptionWarning")] * 2


def test_images_that_require_grad_are_prepared_without_torch_s_warning_and_keep_it():
    """An attack's images (requires_grad) are checked on their values: no torch warning about
    converting a tensor that requires grad, and the gradient still reaches them."""
    import warnings

    from metalearn.data.images import prepare_images

    images = torch.rand(2, 1, 28, 28, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = prepare_images(images, 28, 1)
    prepared.sum().backward()
    assert torch.equal(images.grad, torch.ones_like(images))


# -- counts, draws, configurations and sets a notebook gets wrong ------------------------------


def test_counts_and_draws_that_are_no_whole_numbers_or_generators_are_refused_by_name():
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(40, 3), torch.arange(40) % 4
    x = torch.zeros(1, 2, 1)
    cases = {
        lambda: SinusoidTasks(shots=5.0): "SinusoidTasks's shots is a whole number, got 5.0 (float)",
        lambda: SinusoidTasks(query="10"): "SinusoidTasks's query is a whole number, got '10' (str)",
        lambda: SinusoidTasks(noise_std=-1.0): "SinusoidTasks's noise_std is a standard deviation, 0 or more, got -1.0",
        lambda: SinusoidTasks().sample(2, 0): "SinusoidTasks.sample draws from a torch.Generator, e.g. "
                                              "torch.Generator().manual_seed(0), got int",
        lambda: SinusoidTasks().sample(-1, generator): "SinusoidTasks.sample draws at least one task, got num_tasks=-1",
        lambda: SinusoidTasks().sample(2.0, generator): "SinusoidTasks.sample's num_tasks is a whole number, got 2.0 "
                                                        "(float)",
        lambda: EpisodeSampler.from_labels(features, labels, 2.0, 1, 1): "EpisodeSampler's ways is a whole number, "
                                                                         "got 2.0 (float)",
        lambda: EpisodeSampler.from_labels(features, labels, 2, 1, 1).sample(0, generator):
            "EpisodeSampler.sample draws at least one task, got num_tasks=0",
        lambda: EpisodeSampler.from_labels(features, ["a", "b"] * 20, 2, 1, 1):
            "EpisodeSampler.from_labels takes labels as (n,) integers; map class names to ids first, e.g. ids = "
            "{name: i for i, name in enumerate(sorted(set(names)))}",
        lambda: TaskBatch(x, x, x, x, ways="5"): "TaskBatch's ways is a whole number, got '5' (str)",
        lambda: TaskBatch(x, x, x, x, ways=-1): "TaskBatch's ways is the number of classes (0 for regression), got -1",
        # torch takes these as indices too; a truth value or a tensor of one element is no count
        lambda: SinusoidTasks(shots=torch.tensor(True)): "SinusoidTasks's shots is a whole number, got tensor(True) "
                                                          "(Tensor)",
        lambda: SinusoidTasks().sample(torch.tensor([3]), generator): "SinusoidTasks.sample's num_tasks is a whole "
                                                                       "number, got tensor([3]) (Tensor)",
    }
    for call, expected in cases.items():
        assert refusal(call) == expected
    assert SinusoidTasks(shots=5).sample(2, generator).support_x.shape == (2, 5, 1)  # numbers as they should be
    # any integer Python takes as an index: NumPy's, a 0-d integer tensor; any real noise scale
    import numpy as np
    assert SinusoidTasks(shots=np.int64(5), noise_std=np.float32(0.1)).sample(torch.tensor(3), generator
                                                                                  ).support_x.shape == (3, 5, 1)


def test_a_run_config_of_dicts_or_a_method_s_config_object_is_refused_before_training():
    from metalearn.config import RunConfig

    assert refusal(lambda: RunConfig(method="protonet", task={"ways": 5})).startswith(
        "RunConfig's task is a TaskConfig, got dict: give TaskConfig(**...), or resolve_config(method, task={...})")
    assert refusal(lambda: RunConfig(method="maml", method_config=MAML.Config())) == (
        "RunConfig's method_config is a dict of the method's options (dataclasses.asdict(config) of a method's "
        "Config), got MAMLConfig")
    assert refusal(lambda: RunConfig(method="maml", train=None)).startswith("RunConfig's train is a TrainConfig")


def test_maml_adapt_refuses_a_set_of_another_type_or_device_and_steps_that_are_no_count():
    maml = MAML(MLP(1, 1))
    params = dict(maml.model.named_parameters())
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    assert refusal(lambda: maml.adapt(params, x.double(), y, 1)) == (
        "MAML.adapt: support_x is torch.float64 and the parameters torch.float32; convert the set "
        "(support_x.to(torch.float32)) or the network")
    assert refusal(lambda: maml.adapt(params, x.to("meta"), y.to("meta"), 1)) == (
        "MAML.adapt: support_x is on meta and the parameters on cpu; move the set (support_x.to('cpu'))")
    for steps in (1.5, -1, True):
        assert refusal(lambda: maml.adapt(params, x, y, steps)) == (
            f"MAML.adapt's steps is a whole number of inner steps, 0 or more, got {steps!r}")
    assert len(maml.adapt(params, x, y, 0)) == 1  # no step: the parameters given


def test_a_run_folder_that_is_a_file_or_lies_below_one_is_refused_in_one_line(tmp_path):
    from metalearn import Trainer
    from metalearn.api import resolve_config, train

    (tmp_path / "notes.txt").write_text("")
    config = resolve_config("maml", task={"dataset": "sinusoid"}, train={"steps": 1, "val_every": 0})
    assert refusal(lambda: train(config, run_dir=tmp_path / "notes.txt" / "run", progress=False)) == (
        f"{tmp_path / 'notes.txt' / 'run'}: {tmp_path / 'notes.txt'} is a file, not a folder")
    assert refusal(lambda: Trainer(config, MAML(MLP()), SinusoidTasks(), None, tmp_path / "notes.txt")) == (
        f"Trainer's run_dir {tmp_path / 'notes.txt'} is a file, not a folder; give a folder path")


def test_training_into_another_method_s_run_folder_names_its_method(tmp_path):
    from metalearn.api import resolve_config, train

    def config(method):
        return resolve_config(method, task={"dataset": "sinusoid"},
                              train={"steps": 1, "val_every": 0, "meta_batch_size": 2, "log_every": 1})

    train(config("maml"), run_dir=tmp_path, progress=False, evaluate_after=False, announce=None)
    assert refusal(lambda: train(config("reptile"), run_dir=tmp_path, progress=False)) == (
        f"{tmp_path} already holds a maml run; choose another run_dir for this reptile run")


def test_grey_images_without_their_channel_axis_are_told_to_add_it():
    protonet = build_learner("protonet", {}, Problem(input_shape=(1, 16, 16), output_dim=5, classification=True))
    batch = image_batch(tasks=1, ways=5, shots=1, query=1, dtype=torch.float32)
    flat = TaskBatch(batch.support_x[:, :, 0], batch.support_y, batch.query_x[:, :, 0], batch.query_y, ways=5)
    assert refusal(lambda: protonet.predict(flat)) == (
        "protonet: the tasks' inputs have shape (16, 16) per example, but the network was built for (1, 16, 16): add "
        "the channel axis (x.unsqueeze(-3): (tasks, n, H, W) becomes (tasks, n, 1, H, W)) (for a dataset of your own: "
        "its problem(task) gives the shape of the examples its task source draws)")


def test_a_checkpoint_folder_or_a_run_s_file_in_place_of_the_other_is_named(tmp_path):
    from metalearn.api import resolve_config, train
    from metalearn.checkpoints import load_trained

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 1, "val_every": 0, "meta_batch_size": 2, "log_every": 1})
    train(config, run_dir=tmp_path, progress=False, evaluate_after=False, announce=None)
    assert refusal(lambda: load_trained(tmp_path, checkpoint=tmp_path)) == (
        f"checkpoint is one of the run's checkpoint files, got the folder {tmp_path}; the run's best: "
        f"RunDir({str(tmp_path)!r}).best_checkpoints()")
    assert refusal(lambda: resolve_config("maml", resume_from=tmp_path / "checkpoint.pt")) == (
        f"{tmp_path / 'checkpoint.pt'} is a file of the run in {tmp_path}: give the run's folder, {tmp_path}")


def test_networks_plots_labels_and_limits_given_the_wrong_kind_of_value_are_refused_by_name(tmp_path):
    from metalearn import Trainer
    from metalearn.api import plot_run, resolve_config, train
    from metalearn.uncertainty import run_labels

    assert refusal(lambda: MLP(1, 1, hidden=40)) == (
        "MLP's hidden is a tuple of layer widths, e.g. (40, 40), or (40,) for one layer, got 40")
    assert refusal(lambda: MLP(0)) == "MLP's in_features is a whole number of at least 1, got 0 (int)"
    assert refusal(lambda: MLP(1, 1, hidden=(40, 0))) == (
        "MLP's hidden holds layer widths, whole numbers of at least 1, got (40, 0)")
    assert refusal(lambda: Conv4(1, 5, hidden="64")) == "Conv4's hidden is a whole number of at least 1, got '64' (str)"
    assert refusal(lambda: Conv4(1, -1)) == "Conv4's out_features is a whole number of at least 1, got -1 (int)"
    assert refusal(lambda: evaluate(MAML, SinusoidTasks())).endswith(
        "got the class MAML itself (build one: MAML(network, ...))")
    x = torch.zeros(1, 2, 1)
    assert refusal(lambda: TaskBatch(x, x, x, x, task_params=[1, 2])) == (
        "TaskBatch's task_params is a dict of name -> tensor (tasks, ...), got list")
    assert refusal(lambda: run_labels("runs/a")) == (
        "run_labels takes a list of run folders, got one path 'runs/a': give ['runs/a', ...]")

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 1, "val_every": 0, "meta_batch_size": 2, "log_every": 1})
    assert refusal(lambda: Trainer(config, MAML(MLP()), SinusoidTasks(), None, tmp_path / "t").fit(
        time_limit_s="5")) == "time_limit_s is a number of seconds, got '5'"
    run = tmp_path / "run"
    for flag_value in ("yes", None):
        assert refusal(lambda: train(config, run_dir=run, resume=flag_value, progress=False)) == (
            f"train's resume is True or False, got {flag_value!r}")
    train(config, run_dir=run, progress=False, evaluate_after=False, announce=None)
    (tmp_path / "notes.txt").write_text("")
    assert refusal(lambda: plot_run(run, out_dir=tmp_path / "notes.txt")) == (
        f"out_dir {tmp_path / 'notes.txt'} is a file, not a folder; give a folder path")
    for step in ("2", -1):
        assert refusal(lambda: plot_run(run, until_step=step)) == (
            f"plot_run's until_step is a whole number of at least 0, got {step!r} ({type(step).__name__})")


def test_a_method_whose_network_attribute_names_a_part_still_checks_the_network_it_runs():
    """network_attribute says what --init-from copies (a backbone, say); the built-in methods check
    the network they run, self.model, whatever it names."""
    class Body(MAML):
        network_attribute = "body"

        def __init__(self, model, config=MAML.Config()):
            super().__init__(model, config)
            self.body = model[0]

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    batch = SinusoidTasks(shots=5, query=5).sample(2, torch.Generator().manual_seed(0))
    body = Body(net, MAML.Config(inner_lr=0.01))
    loss, _ = body.meta_loss(batch)
    # the whole network ran (self.body, Linear(1, 8), has 8 outputs): the loss of a plain MAML of a copy
    expected, _ = MAML(copy.deepcopy(net), MAML.Config(inner_lr=0.01)).meta_loss(batch)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    # and the check measured self.model's outputs, (1,), not the body's (8,)
    two = TaskBatch(batch.support_x, batch.support_y.repeat(1, 1, 2), batch.query_x, batch.query_y.repeat(1, 1, 2))
    assert refusal(lambda: body.meta_loss(two)) == (
        "maml: the network has outputs of shape (1,) (per example) but the regression targets have shape (2,) "
        "per example")


def test_plotting_a_run_s_file_names_the_run_s_folder(tmp_path):
    from metalearn.api import plot_run, resolve_config, train

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 1, "val_every": 0, "meta_batch_size": 2, "log_every": 1})
    train(config, run_dir=tmp_path, progress=False, evaluate_after=False, announce=None)
    assert refusal(lambda: plot_run(tmp_path / "checkpoint.pt")) == (
        f"{tmp_path / 'checkpoint.pt'} is a file of the run in {tmp_path}: give the run's folder, {tmp_path}")
    (tmp_path / "plots").write_text("")  # a file where the run's own figures go
    assert refusal(lambda: plot_run(tmp_path)) == f"{tmp_path / 'plots'} is a file, not a folder; give a folder path"


def test_one_number_examples_and_targets_without_their_axis_are_told_the_axis_they_lack():
    """Scalar inputs and targets (tasks, n) are the likeliest mistake of a calibration or curve
    user: the refusal names the last axis of 1 beside the leading one; integer targets shaped
    as regression targets are told to become floats, not to give ways."""
    x = torch.linspace(-5, 5, 40).reshape(4, 10)
    y = (2 * x + 1).unsqueeze(-1)
    maml = MAML(MLP(1, 1))
    assert "examples of one number each need a last axis of 1 (x.unsqueeze(-1))" in refusal(
        lambda: maml.meta_loss(TaskBatch(x, y, x, y)))
    assert "targets of one number each need a last axis of 1 (y.unsqueeze(-1))" in refusal(
        lambda: maml.meta_loss(TaskBatch(x[..., None], y[..., 0], x[..., None], y[..., 0])))
    whole = y.round().long()
    assert refusal(lambda: maml.meta_loss(TaskBatch(x[..., None], whole, x[..., None], whole))) == (
        "maml: this TaskBatch's targets are torch.int64 of shape (4, 10, 1): regression targets are floating point "
        "(y.float()); class labels are (tasks, examples) with TaskBatch(..., ways=N)")
    assert refusal(lambda: EpisodeSampler.from_labels(torch.randn(30), torch.arange(30) % 3, 2, 1, 1)).endswith(
        "got (30,) examples and 30 labels; examples of one number each need a last axis of 1 (examples[:, None])")


def test_a_network_that_cannot_run_as_a_batched_function_of_its_parameters_is_refused_in_one_line(monkeypatch):
    """A forward that bumps a buffer (a call counter) and spectral_norm's power iteration fail
    inside torch.func with dozens of frames; MAML and Reptile refuse them in one line naming the
    cause. LayerNorm, dropout and constant buffers run."""
    from metalearn.algorithms import Reptile

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.linear(x)

    batch = SinusoidTasks(shots=5, query=5).sample(4, torch.Generator().manual_seed(0))
    for learner in (MAML(Counter()), Reptile(Counter())):
        assert refusal(lambda: learner.meta_loss(batch)).startswith(
            f"{learner.name}: the network cannot run as a function of its parameters, differentiated and batched over "
            f"tasks (torch.func.grad and vmap), as {learner.name} runs it: its forward changes a buffer or attribute "
            "in place (a counter, a running statistic): keep such state out of forward (torch: During a grad")
    spectral = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(1, 8)), nn.ReLU(), nn.Linear(8, 1))
    assert "an operation in its forward cannot run so; replace that layer (torch: Batching rule not implemented" in (
        refusal(lambda: MAML(spectral).meta_loss(batch)))

    class Mine(nn.Module):  # a class of the user's: probed (torch's layers alone are not)
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.1), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1))
            self.register_buffer("scale", torch.ones(()))

        def forward(self, x):
            return self.layers(x) * self.scale

    probed, real = [], torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *args, **kwargs: (probed.append(1), real(*args, **kwargs))[1])
    assert torch.isfinite(MAML(Mine()).meta_loss(batch)[0]) and probed


# -- the Python API's paths, on/off keywords and progress bars, as the command line takes them -----------


def tiny_run(folder):
    """A two-step sinusoid run in ``folder``, untested: something for the readers to read."""
    from metalearn.api import resolve_config, train

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 2, "val_every": 0, "meta_batch_size": 2, "log_every": 1})
    train(config, run_dir=folder, progress=False, evaluate_after=False, announce=None)
    return config


def test_an_empty_path_is_refused_naming_its_keyword_and_never_read_as_the_current_folder(tmp_path, monkeypatch):
    """``Path("")`` is the current folder: train, export and plot would write there unasked, and
    the readers would read it. Each public function refuses an empty (or blank) path in one line
    naming its keyword, as the command line refuses ``--run-dir ''``; None keeps its default."""
    from metalearn.aggregate import summarize_runs
    from metalearn.api import (evaluate_run, export_results, plot_run, predict_run, resolve_config, run_status,
                               sample_run, train)
    from metalearn.checkpoints import load_trained
    from metalearn.tasks import build_task_source
    from metalearn.uncertainty import compare_learners

    run = tmp_path / "run"
    config = tiny_run(run)
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    out = tmp_path / "out"
    for call, message in (
            (lambda: train(config, "", progress=False), "run_dir is empty; give a folder path"),
            (lambda: train(config, "  ", progress=False), "run_dir is empty; give a folder path"),
            (lambda: train(config, tmp_path / "new", data_dir="", progress=False),
             "data_dir is empty; give a folder path"),
            (lambda: export_results(run, ""), "out_dir is empty; give a folder path"),
            (lambda: export_results("", out), "run_dir is empty; give a run folder"),
            (lambda: export_results(run, out, compare_with=""), "compare_with is empty; give a run folder"),
            (lambda: plot_run(run, out_dir=""), "out_dir is empty; give a folder path"),
            (lambda: plot_run(run, data_dir=" "), "data_dir is empty; give a folder path"),
            (lambda: evaluate_run("", progress=False), "run_dir is empty; give a run folder"),
            (lambda: evaluate_run(run, split_file="", progress=False), "split_file is empty; give a JSON file"),
            (lambda: run_status(""), "run_dir is empty; give a run folder"),
            (lambda: load_trained(""), "run_dir is empty; give a run folder"),
            (lambda: resolve_config("maml", resume_from=""), "resume_from is empty; give a run folder"),
            (lambda: resolve_config("maml", train={"init_from": " "}),
             "TrainConfig.init_from is blank (give a run folder, or \"\" for none), got ' '"),
            (lambda: predict_run(run, "s", "q", json_out=""), "json_out is empty; give a file path"),
            (lambda: sample_run(run, "s", out=""), "out is empty; give a file path"),
            (lambda: compare_learners({"a": run, "b": ""}), "runs['b'] is empty; give a run folder"),
            (lambda: compare_learners({"a": run}, data_dir=""), "data_dir is empty; give a folder path"),
            (lambda: summarize_runs(["", run]), "run_dir is empty; give a run folder"),
            (lambda: build_task_source(config.task, "test", data_dir=""), "data_dir is empty; give a folder path")):
        assert refusal(call) == message
    assert sorted(p.name for p in here.iterdir()) == ["notes.txt"]
    # None is no path given: the default (a generated task reads no folder)
    assert build_task_source(config.task, "test", data_dir=None, progress=False) is not None
    assert resolve_config("maml", task={"dataset": "sinusoid"}, train={"init_from": ""}).train.init_from == ""


def test_on_off_keywords_are_true_or_false_as_train_s_are(tmp_path):
    """``ensemble="False"`` is a true string: evaluate_run would run an ensemble evaluation.
    Every on/off keyword of the public functions is refused unless True or False."""
    from metalearn.api import evaluate_run, train
    from metalearn.tasks import build_task_source

    run = tmp_path / "run"
    config = tiny_run(run)
    for keyword, value in (("ensemble", "False"), ("per_step", "no"), ("exact_gpu_kernels", None)):
        assert refusal(lambda: evaluate_run(run, episodes=3, progress=False, **{keyword: value})) == (
            f"evaluate_run's {keyword} is True or False, got {value!r}")
    assert refusal(lambda: evaluate_run(run, episodes=3, progress="yes")) == (
        "evaluate_run's progress is True, False or None (bars when the error output is a terminal), got 'yes'")
    assert refusal(lambda: train(config, tmp_path / "new", exact_gpu_kernels="no")) == (
        "train's exact_gpu_kernels is True or False, got 'no'")
    assert refusal(lambda: build_task_source(config.task, "test", evaluation="yes")) == (
        "build_task_source's evaluation is True or False, got 'yes'")
    assert not list(run.glob("eval*.json")) and not (tmp_path / "new").exists()
    assert evaluate_run(run, episodes=3, progress=False, per_step=False, ensemble=False)["episodes"] == 3


def test_evaluate_run_takes_a_device_or_a_world_not_both(tmp_path):
    """A world computes on its own device: a device given beside it would be dropped silently."""
    from metalearn.api import evaluate_run
    from metalearn.distributed import init_world

    run = tmp_path / "run"
    tiny_run(run)
    world, before = init_world("cpu"), sorted(run.glob("eval*.json"))
    assert refusal(lambda: evaluate_run(run, episodes=3, progress=False, world=world, device="cuda:7")) == (
        "evaluate_run takes device or world, not both: a world computes on its own device (cpu), not on "
        "device='cuda:7'")
    assert sorted(run.glob("eval*.json")) == before  # nothing written
    by_world = evaluate_run(run, episodes=3, progress=False, world=world)
    assert by_world["mean"] == evaluate_run(run, episodes=3, progress=False, device="cpu")["mean"]


def test_progress_bars_by_default_in_a_notebook_whose_output_is_no_terminal(monkeypatch):
    """A Jupyter cell's error output is no terminal but redraws a bar in place: bars by default."""
    import sys

    from metalearn.runtime import show_progress

    class OutStream:  # as ipykernel's, which says it is no terminal
        def isatty(self):
            return False

    OutStream.__module__ = "ipykernel.iostream"
    monkeypatch.setattr(sys, "stderr", OutStream())
    assert show_progress(None) is True and show_progress(False) is False
    OutStream.__module__ = "somewhere.else"
    assert show_progress(None) is False


def test_progress_bars_from_python_by_default_only_when_the_error_output_is_a_terminal(tmp_path, capsys,
                                                                                         monkeypatch):
    """train, evaluate_run and a Trainer's fit draw bars by default only on a terminal, as the
    command line does: a script's output piped into a log would fill it with redraws. True and
    False still decide."""
    import sys

    from metalearn.api import evaluate_run, resolve_config, train
    from metalearn.training import build_trainer

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 2, "val_every": 0, "meta_batch_size": 2, "eval_episodes": 3})
    for given, terminal, drawn in ((None, False, False), (None, True, True), (True, False, True),
                                   (False, True, False)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda terminal=terminal: terminal, raising=False)
        run = tmp_path / f"run-{given}-{terminal}"
        train(config, run, announce=None, **({} if given is None else {"progress": given}))
        err = capsys.readouterr().err
        assert ("%|" in err) is drawn, (given, terminal, err)  # a tqdm bar: "  0%|"
        evaluate_run(run, episodes=4, **({} if given is None else {"progress": given}))
        err = capsys.readouterr().err
        assert ("%|" in err) is drawn, (given, terminal, err)
        trainer = build_trainer(config, tmp_path / f"fit-{given}-{terminal}", tested=False)
        trainer.fit(**({} if given is None else {"progress": given}))
        err = capsys.readouterr().err
        assert ("%|" in err) is drawn, (given, terminal, err)


# -- options by keyword: a swapped call (evaluate_run(run, 20, 1): episodes or seed?) cannot pass unseen ----------


KEYWORD_ONLY_AFTER = {  # each public function's leading parameters, which alone are taken by position
    "metalearn.api.train": ["config", "run_dir"], "metalearn.api.evaluate_run": ["run_dir"],
    "metalearn.api.predict_run": ["run_dir", "support", "query"], "metalearn.api.sample_run": ["run_dir", "support"],
    "metalearn.api.plot_run": ["run_dir"], "metalearn.api.export_results": ["run_dir", "out_dir"],
    "metalearn.uncertainty.compare_learners": ["runs"],
    "metalearn.evaluation.evaluate": ["learner", "source", "episodes"],
    "metalearn.training.build_trainer": ["config", "run_dir"],
    "metalearn.training.Trainer.__init__": ["self", "config", "learner", "train_tasks", "val_tasks", "run_dir"],
    "metalearn.training.Trainer.fit": ["self"], "metalearn.checkpoints.load_trained": ["run_dir"],
    "metalearn.aggregate.summarize_runs": ["run_dirs"], "metalearn.tasks.build_task_source": ["task", "part"]}


def public(path: str):
    """The function (or method: ``module.Class.method``) that ``path`` names."""
    import importlib

    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module, then its attributes
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise LookupError(path)


def deprecations(call):
    """What ``call()`` returns, and the DeprecationWarnings it gives, each shown (not once per place)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_options_given_by_position_still_work_with_one_warning_that_names_their_keywords(tmp_path):
    """For one release, the options after the leading parameters are still taken by position, in
    the order they had, with one DeprecationWarning per call that names them as keywords at the
    caller's line; the result is the keyword call's."""
    from metalearn.api import evaluate_run

    run = tmp_path / "run"
    tiny_run(run)
    by_keyword = evaluate_run(run, episodes=3, seed=1, progress=False)
    by_position, warned = deprecations(lambda: evaluate_run(run, 3, 1, progress=False))
    assert [(str(w.message), w.filename) for w in warned] == [(
        "evaluate_run: give episodes=3, seed=1 by keyword; passing them by position is deprecated and will be "
        "refused", __file__)]
    assert (by_position["episodes"], by_position["seed"]) == (3, 1)
    assert by_position["scores"] == by_keyword["scores"] and by_position["mean"] == by_keyword["mean"]
    # one option: named alone
    learner, source = MAML(MLP(1, 1)), SinusoidTasks(shots=2, query=3)
    by_keyword = evaluate(learner, source, 2, seed=7)
    by_position, warned = deprecations(lambda: evaluate(learner, source, 2, 7))
    assert [str(w.message) for w in warned] == [
        "evaluate: give seed=7 by keyword; passing it by position is deprecated and will be refused"]
    assert by_position["scores"] == by_keyword["scores"]
    # within the signature: no warning
    again, warned = deprecations(lambda: evaluate(learner, source, 2, seed=7))
    assert warned == [] and again["scores"] == by_keyword["scores"]


def test_the_trainer_loaders_and_task_sources_take_their_options_by_keyword(tmp_path):
    """Trainer (after what it trains: config, learner, tasks, run folder), Trainer.fit,
    load_trained, summarize_runs and build_task_source, as the other public functions: options
    given by position still work, in their old order, with a DeprecationWarning that names their
    keywords; given by keyword, no warning."""
    import warnings

    from metalearn.aggregate import summarize_runs
    from metalearn.api import resolve_config, train
    from metalearn.checkpoints import load_trained
    from metalearn.distributed import World
    from metalearn.runs import RunDir
    from metalearn.tasks import build_task_source
    from metalearn.training import Trainer

    def silent(call):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            return call()

    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 2, "val_every": 0, "meta_batch_size": 2, "log_every": 1})

    def trained(folder, by_keyword):
        torch.manual_seed(0)  # the same initial weights and draws for both calls
        learner, tasks = MAML(MLP(1, 1)), SinusoidTasks(shots=2, query=3)
        if by_keyword:
            silent(lambda: Trainer(config, learner, tasks, None, folder, world=World(), resume=False).fit(
                progress=False, time_limit_s=None))
            return learner
        with pytest.warns(DeprecationWarning, match=r"^Trainer: give world=World\(.*\), resume=False by keyword; "
                                                    r"passing them by position is deprecated"):
            trainer = Trainer(config, learner, tasks, None, folder, World(), False)
        with pytest.warns(DeprecationWarning, match=r"^Trainer.fit: give progress=False, time_limit_s=None by keyword; "
                                                    r"passing them by position is deprecated"):
            trainer.fit(False, None)
        return learner

    by_keyword, by_position = trained(tmp_path / "keyword", True), trained(tmp_path / "position", False)
    assert RunDir(tmp_path / "position").read_checkpoint("step")["step"] == 2
    for (name, value), other in zip(by_keyword.state_dict().items(), by_position.state_dict().values()):
        assert torch.equal(value, other), name
    # load_trained(run_dir, overrides, checkpoint)
    run = tmp_path / "keyword"
    _, loaded, step = silent(lambda: load_trained(run, overrides={"test_inner_steps": 3}, checkpoint=None))
    with pytest.warns(DeprecationWarning, match=r"^load_trained: give overrides=\{'test_inner_steps': 3\}, "
                                                r"checkpoint=None by keyword; passing them by position"):
        _, again, again_step = load_trained(run, {"test_inner_steps": 3}, None)
    assert step == again_step == 2 and again.config.test_inner_steps == loaded.config.test_inner_steps == 3
    # build_task_source(task, part, data_dir, progress, evaluation)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    batch = silent(lambda: build_task_source(config.task, "train", data_dir=None, progress=False, evaluation=True))
    with pytest.warns(DeprecationWarning, match=r"^build_task_source: give data_dir=None, progress=False, "
                                                r"evaluation=True by keyword; passing them by position"):
        same = build_task_source(config.task, "train", None, False, True)
    assert torch.equal(batch.sample(2, generator()).query_x, same.sample(2, generator()).query_x)
    # summarize_runs(run_dirs, group_by, evaluation)
    tested = tmp_path / "tested"
    train(resolve_config("maml", task={"dataset": "sinusoid"},
                         train={"steps": 1, "val_every": 0, "meta_batch_size": 2, "eval_episodes": 2}),
          run_dir=tested, progress=False, announce=None)
    summary = silent(lambda: summarize_runs([tested], group_by=None, evaluation="eval"))
    with pytest.warns(DeprecationWarning, match=r"^summarize_runs: give group_by=None, evaluation='eval' by keyword; "
                                                r"passing them by position"):
        assert summarize_runs([tested], None, "eval") == summary
    assert summary["groups"][0]["n"] == 1


@keyword_only_after(1)
def swapped(run_dir, *, episodes=None, seed=0):
    """evaluate_run's leading parameters, without its work."""
    return run_dir, episodes, seed


def older(run_dir, episodes=None, seed=0):
    """``swapped``'s signature without `*`."""
    return run_dir, episodes, seed


def test_an_option_given_both_ways_or_too_many_positionals_are_python_s_type_errors(tmp_path):
    """The TypeError Python gives for the signature as it was without `*`, before anything is read."""
    import inspect

    from metalearn.api import evaluate_run

    def type_error(call) -> str:
        with pytest.raises(TypeError) as info:
            call()
        return str(info.value).replace("older(", "swapped(")

    for args, kwargs in (((1, 2), {"episodes": 3}), ((1, 2, 3, 4), {}), ((1, 2, 3, 4), {"episodes": 3}),
                         ((1, 2, 3), {"seed": 3})):
        assert type_error(lambda: swapped(*args, **kwargs)) == type_error(lambda: older(*args, **kwargs))
    assert type_error(lambda: swapped(1, 2, 3, 4)) == (
        "swapped() takes from 1 to 3 positional arguments but 4 were given")
    assert type_error(lambda: swapped(1, 2, episodes=3)) == "swapped() got multiple values for argument 'episodes'"
    run = tmp_path / "run"
    tiny_run(run)
    before = sorted(run.iterdir())
    with pytest.raises(TypeError, match=r"^evaluate_run\(\) got multiple values for argument 'episodes'$"):
        evaluate_run(run, 3, episodes=3, progress=False)
    most = len(inspect.signature(evaluate_run).parameters)
    with pytest.raises(TypeError, match=rf"^evaluate_run\(\) takes from 1 to {most} positional arguments but "
                                        rf"{most + 1} were given$"):
        evaluate_run(run, *[None] * most)
    assert sorted(run.iterdir()) == before  # nothing evaluated or written
    # a long value is cut short in the warning
    assert [str(w.message) for w in deprecations(lambda: swapped("run", "x" * 100))[1]] == [
        f"swapped: give episodes='{'x' * 17}...{'x' * 18}' by keyword; passing it by position is deprecated and "
        "will be refused"]
    with pytest.raises(TypeError, match=r"^keyword_only_after\(1\) needs .*<locals>\.plain to take 1 "):
        @keyword_only_after(1)
        def plain(run_dir, episodes=None):  # no `*`: nothing to map
            return run_dir, episodes


def test_the_signatures_show_the_options_as_keyword_only(pytestconfig):
    """inspect.signature (as editors and the API docs read it) shows the `*`; the wrapper keeps
    the function's name and docstring; pytest's settings turn the deprecation into an error, so
    that no caller in the library, its tests or its docs' examples passes an option by position."""
    import inspect
    import re

    for path, leading in KEYWORD_ONLY_AFTER.items():
        name = path.rsplit(".", 1)[1]
        function = public(path)
        parameters = inspect.signature(function).parameters.values()
        assert [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD] == leading, path
        assert all(p.kind is p.KEYWORD_ONLY for p in list(parameters)[len(leading):]), path
        assert (function.__name__, function.__doc__) == (name, function.__wrapped__.__doc__), path
    messages = [str(w.message) for call in (lambda: swapped(1, 2), lambda: swapped(1, 2, 3))
                for w in deprecations(call)[1]]
    errors = [text for action, text, category, *_ in (line.split(":") for line in pytestconfig.getini("filterwarnings"))
              if action == "error" and category == "DeprecationWarning"]
    assert len(messages) == 2 and all(any(re.match(text, message, re.I) for text in errors) for message in messages), (
        messages, errors)
