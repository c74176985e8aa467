"""The evaluator's bookkeeping across ranks: which episodes each rank scores, and how the
gathered rows are put back in the order one process would have scored them.

A real job runs in test_distributed.py (two ranks, chunks that split evenly enough that no rank
sits a chunk out); here ranks are simulated in one process, so that uneven splits, a last chunk
smaller than the number of ranks included, run on any machine in a few seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import pytest
import torch

from metalearn.algorithms import MAML
from metalearn.distributed import World
from metalearn.errors import MetalearnError
from metalearn.evaluation import episode_order, evaluate
from metalearn.models import MLP
from metalearn.tasks import SinusoidTasks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_episode_order_by_hand_with_a_last_chunk_smaller_than_the_ranks():
    # 51 episodes on 3 ranks in chunks of 50 and 1. Chunk 0 splits 17/17/16: rank 0 scores
    # episodes 0-16, rank 1 17-33, rank 2 34-49. Chunk 1 (episode 50) goes to rank 0 alone.
    # The gather concatenates by rank: 0-16, 50 | 17-33 | 34-49.
    gathered_episodes = [*range(0, 17), 50, *range(17, 34), *range(34, 50)]
    gathered = torch.tensor(gathered_episodes, dtype=torch.float64)[:, None].repeat(1, 2)  # two score columns
    chunks = [(0, 50), (50, 1)]
    for rank in range(3):  # every rank restores the same order (rank 0 alone reports it)
        restored = episode_order(World(rank, 3), chunks, gathered)
        assert torch.equal(restored, torch.arange(51, dtype=torch.float64)[:, None].repeat(1, 2))
    # one process: its rows are already in episode order
    assert episode_order(World(), chunks, gathered) is gathered


def evaluate_as_ranks(size: int, **kwargs) -> tuple[dict, dict[int, torch.Tensor]]:
    """``evaluate(**kwargs)`` as each rank of a ``size``-rank job runs it, in this process:
    ranks ``size-1 .. 1`` hand their rows over at the gather (and stop there), then rank 0
    gathers every rank's rows in rank order, as :meth:`World.gather` does. Returns rank 0's
    result and the rows of each rank."""
    rows: dict[int, torch.Tensor] = {}

    class HandedOver(Exception):
        pass

    class SimulatedRank(World):
        def gather(self, values):
            rows[self.rank] = values
            if self.rank != 0:
                raise HandedOver
            return torch.cat([rows[r] for r in range(self.size) if rows[r].numel()])  # as World.gather: empty ranks add nothing

    for rank in reversed(range(size)):
        try:
            result = evaluate(world=SimulatedRank(rank, size), **kwargs)
        except HandedOver:
            pass
    return result, rows


@pytest.mark.parametrize("episodes, chunk, rows_per_rank", [
    (51, 50, [18, 17, 16]),  # chunks 50 + 1: ranks 1 and 2 sit the last one out
    (8, 3, [3, 3, 2]),       # chunks 3 + 3 + 2: one episode each, then rank 2 sits the last one out
    (7, 2, [4, 3, 0]),       # more ranks than a chunk: rank 2 scores no episode at all
    (2, 50, [1, 1, 0]),      # fewer episodes than ranks
])
def test_ranks_scores_come_back_in_the_single_process_order(episodes, chunk, rows_per_rank):
    torch.manual_seed(0)
    learner = MAML(MLP(), MAML.Config(model="mlp", inner_lr=0.01, test_inner_steps=1))
    source = SinusoidTasks(shots=5, query=5)
    single = evaluate(learner, source, episodes=episodes, seed=3, chunk=chunk)
    shared, rows = evaluate_as_ranks(3, learner=learner, source=source, episodes=episodes, seed=3, chunk=chunk)
    # after 0 and 1 steps; a rank that scored nothing knows no step count
    assert [rows[r].shape for r in range(3)] == [(n, 2) if n else (0, 0) for n in rows_per_rank]
    assert shared["episodes"] == single["episodes"] == episodes
    if episodes > chunk:  # over several chunks the rows as gathered (rank by rank) are out of episode
        # order: the comparison below would see a mix-up
        as_gathered = torch.cat([rows[r] for r in range(3) if rows[r].numel()])[:, -1]
        assert not torch.allclose(as_gathered, torch.tensor(single["scores"], dtype=torch.float64), rtol=1e-3)
    torch.testing.assert_close(torch.tensor(shared["scores"]), torch.tensor(single["scores"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(shared["per_step"]), torch.tensor(single["per_step"]),
                               rtol=1e-5, atol=1e-6)
    assert shared["ci95"] == pytest.approx(single["ci95"], rel=1e-5)


def test_evaluate_restores_the_training_mode_also_when_an_episode_fails(monkeypatch):
    learner = MAML(MLP(1, 1, hidden=(4,)), MAML.Config(inner_lr=0.01))
    learner.train()

    def fail(batch):
        assert not learner.training  # episodes are scored in eval mode
        raise RuntimeError("a failing episode")

    monkeypatch.setattr(learner, "predict_per_step", fail)
    monkeypatch.setattr(learner, "predict", fail)
    with pytest.raises(RuntimeError, match="a failing episode"):
        evaluate(learner, SinusoidTasks(shots=5, query=5), episodes=2, progress=False)
    assert learner.training


def test_a_number_of_episodes_beyond_any_interval_is_refused_before_it_runs_for_days():
    from metalearn.config import MAX_EPISODES, TrainConfig

    learner = MAML(MLP(1, 1, hidden=(4,)), MAML.Config(inner_lr=0.01))
    with pytest.raises(MetalearnError, match=r"^episodes must be at most 10,000,000 \(the intervals of papers use "
                                             r"600 to 10,000\), got 10000001$"):
        evaluate(learner, SinusoidTasks(shots=5, query=5), episodes=MAX_EPISODES + 1, progress=False)
    for name in ("val_episodes", "eval_episodes"):
        with pytest.raises(MetalearnError, match=rf"TrainConfig.{name} must be at most 10,000,000"):
            TrainConfig(**{name: 10**11})
    assert TrainConfig(val_episodes=MAX_EPISODES).val_episodes == MAX_EPISODES


def test_evaluate_restores_each_submodules_own_mode():
    """A submodule the user put in eval mode inside a training network (a frozen layer) is still
    in eval mode after an evaluation, and the rest is back in training mode."""
    from metalearn.algorithms.base import evaluating

    learner = MAML(MLP(1, 1, hidden=(4,)), MAML.Config(inner_lr=0.01))
    learner.train()
    frozen = next(module for module in learner.model.modules() if isinstance(module, torch.nn.Linear))
    frozen.eval()
    evaluate(learner, SinusoidTasks(shots=5, query=5), episodes=2, progress=False)
    assert not frozen.training
    assert all(module.training for module in learner.modules() if module is not frozen)
    with pytest.raises(ValueError), evaluating(learner):
        assert not any(module.training for module in learner.modules())
        raise ValueError
    assert not frozen.training and learner.training and learner.model.training


def test_the_pixel_nearest_neighbour_baseline_takes_the_class_of_the_nearest_support_image():
    """scripts/pixel-nearest-neighbour.py (the statistician page's baseline column): each query
    takes the class of its nearest support image, also with several images a class."""
    import importlib.util
    from pathlib import Path

    from metalearn.tasks.batch import TaskBatch

    path = Path(__file__).resolve().parents[1] / "scripts" / "pixel-nearest-neighbour.py"
    spec = importlib.util.spec_from_file_location("pixel_nearest_neighbour", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    g = torch.Generator().manual_seed(0)
    support_x = torch.rand(2, 6, 1, 5, 5, generator=g)
    support_y = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 2, 1, 0]])
    chosen = [5, 0, 3]  # each query a slightly moved copy of one support image
    batch = TaskBatch(support_x, support_y, support_x[:, chosen] + 0.01, support_y[:, chosen], ways=3)
    scores = script.PixelNearestNeighbour().predict(batch)
    assert scores.shape == (2, 3, 3) and torch.equal(scores.argmax(-1), support_y[:, chosen])
    # another class's score: minus the squared distance to the nearer of its two images
    nearest = min((batch.query_x[0, 0] - support_x[0, i]).square().sum() for i in (0, 1))
    assert torch.allclose(-scores[0, 0, 0], nearest, rtol=1e-5)


@pytest.mark.parametrize("episodes, chunk, message", [
    (0, 50, "episodes must be a whole number of at least 1, got 0"),
    (-1, 50, "episodes must be a whole number of at least 1, got -1"),
    (2.5, 50, "episodes must be a whole number of at least 1, got 2.5"),
    (4, 0, "chunk must be a whole number of at least 1, got 0"),  # it looped for ever
])
def test_episode_counts_are_whole_numbers_of_at_least_one(episodes, chunk, message):
    maml = MAML(MLP(), MAML.Config(inner_lr=0.01))
    with pytest.raises(MetalearnError, match=message):
        evaluate(maml, SinusoidTasks(shots=5, query=10), episodes=episodes, chunk=chunk, progress=False)


def test_numpy_episode_counts_are_counts():
    import numpy as np

    maml = MAML(MLP(), MAML.Config(inner_lr=0.01))
    result = evaluate(maml, SinusoidTasks(shots=5, query=10), episodes=np.int64(3), chunk=np.int64(2), progress=False)
    assert result["episodes"] == 3


def test_a_learner_that_adapts_without_gradients_is_scored_without_a_graph_or_a_warning():
    """A method whose predictions keep their graph (a plain embedding, a method of one's own):
    its scores are detached, so float() of them does not warn and no chunk's graph is kept."""
    from metalearn.algorithms import MetaLearner

    class Mean(MetaLearner):
        name = "mean-of-support"

        def __init__(self):
            super().__init__()
            self.offset = torch.nn.Parameter(torch.zeros(()))

        def predict(self, batch):
            mean = batch.support_y.mean(1, keepdim=True) + self.offset
            return mean.expand(-1, batch.query_y.shape[1], -1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(Mean(), SinusoidTasks(shots=5, query=10), episodes=4, progress=False)
    assert result["episodes"] == 4 and result["metric"] == "mse"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures memory through "
                    "/proc/self/clear_refs (Linux)")
def test_a_chunk_too_large_for_the_memory_is_scored_in_parts_with_the_same_scores(monkeypatch):
    """A drawn chunk whose scoring would need more than the memory budget (many ways, large
    images) is scored a few episodes per call: the same scores to float rounding. A budget of
    a few bytes leaves room for one episode per call; None scores each chunk at once."""
    import metalearn.evaluation as evaluation

    maml = MAML(MLP(), MAML.Config(inner_lr=0.01, test_inner_steps=2))
    calls = []
    real = evaluation.episode_scores
    monkeypatch.setattr(evaluation, "episode_scores", lambda learner, batch, per_step=True: (
        calls.append(batch.num_tasks), real(learner, batch, per_step))[1])
    tasks = SinusoidTasks(shots=5, query=10)
    whole = evaluate(maml, tasks, episodes=7, chunk=5, progress=False, memory_budget=None)
    assert calls == [5, 2]  # the chunks as drawn, no measurement
    calls.clear()
    parts = evaluate(maml, tasks, episodes=7, chunk=5, progress=False, memory_budget=1e-12)
    assert calls == [1, 1, 1, 1, 1, 1, 1, 1]  # one measured (its scores dropped), then one per call
    assert parts["scores"] == pytest.approx(whole["scores"], rel=1e-6)
    assert parts["per_step"] == pytest.approx(whole["per_step"], rel=1e-6)
    calls.clear()
    fits = evaluate(maml, tasks, episodes=7, chunk=5, progress=False)  # the default budget: all fit at once
    assert calls == [1, 5, 2] and fits["scores"] == whole["scores"]
    with pytest.raises(MetalearnError, match=r"^memory_budget is a fraction in \(0, 1\] or None, got 0$"):
        evaluate(maml, tasks, episodes=3, progress=False, memory_budget=0)
    with pytest.raises(MetalearnError, match=r"^memory_budget is at least 1.175e-38 \(float32's smallest normal "
                                             r"number\), got 1e-320$"):
        evaluate(maml, tasks, episodes=3, progress=False, memory_budget=1e-320)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures memory through "
                    "/proc/self/clear_refs (Linux)")
def test_the_memory_measurement_leaves_a_sampling_methods_draws_as_they_were(monkeypatch):
    # PLATIPUS samples weights for each episode: the measured call's draws are undone, so where the
    # chunk fits its scores are those of scoring it unmeasured, bit for bit
    from metalearn.algorithms.platipus import PLATIPUS

    import metalearn.evaluation as evaluation

    learner = PLATIPUS(MLP(), PLATIPUS.Config(inner_lr=0.01, inner_steps=1, test_inner_steps=1, num_samples=3))
    tasks = SinusoidTasks(shots=5, query=10)
    calls = []
    real = evaluation.episode_scores
    monkeypatch.setattr(evaluation, "episode_scores", lambda learner, batch, per_step=True: (
        calls.append(batch.num_tasks), real(learner, batch, per_step))[1])
    measured = evaluate(learner, tasks, episodes=6, chunk=6, seed=3, progress=False)
    assert calls == [1, 6]  # the measurement ran, then the whole chunk at once
    unmeasured = evaluate(learner, tasks, episodes=6, chunk=6, seed=3, progress=False, memory_budget=None)
    assert measured["scores"] == unmeasured["scores"]


class _Diverging(torch.nn.Module):
    """Perfect logits but for the first task of each batch, whose are NaN (a diverged adaptation);
    ``predict`` only, or ``predict_per_step`` only with ``steps``."""

    def __init__(self, steps: bool = False):
        super().__init__()
        self.steps = steps

    def logits(self, batch):
        logits = torch.nn.functional.one_hot(batch.query_y, batch.ways).float() * 5
        logits[0] = float("nan")
        return logits

    def __getattr__(self, name):
        if name == ("predict_per_step" if self.steps else "predict"):
            return (lambda batch: self.logits(batch).unsqueeze(0)) if self.steps else self.logits
        return super().__getattr__(name)


def _episodes():
    from metalearn.data.splits import ClassPool
    from metalearn.tasks.episodes import EpisodeSampler

    images = torch.randint(0, 255, (20, 10, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return EpisodeSampler(images, ClassPool("mine", torch.arange(20), torch.zeros(20, dtype=torch.long)), ways=5,
                          shots=1, query=3)


@pytest.mark.parametrize("steps", [False, True])
def test_a_learner_with_predict_or_predict_per_step_alone_is_scored_by_the_one_it_has(steps):
    for per_step in (True, False):
        result = evaluate(_Diverging(steps), _episodes(), episodes=4, seed=0, per_step=per_step)
        assert result["diverged"] == 1 and result["mean_of_finite"] == 100.0 and len(result["per_step"]) == 1


def test_compare_scores_a_diverged_episode_as_nan_as_evaluate_does():
    """argmax turns NaN logits into class 0, an accuracy of 1 in ways: the task scores NaN instead."""
    from metalearn.uncertainty import uncertainty_scores

    batch = _episodes().sample(4, torch.Generator().manual_seed(0))
    accuracy = uncertainty_scores(_Diverging(), batch)["accuracy"]
    assert torch.isnan(accuracy[0]) and accuracy[1:].tolist() == [1.0, 1.0, 1.0]


class _TasksWithANaN(SinusoidTasks):
    """Sinusoids whose first task's first support target is NaN: data with a missing value."""

    def sample(self, num_tasks, generator, tasks=None):
        batch = super().sample(num_tasks, generator, tasks)
        batch.support_y[0, 0] = float("nan")
        return batch


class _TasksWithoutATaskAxis(SinusoidTasks):
    """Sinusoids whose support targets lost their task axis: a malformed batch."""

    def sample(self, num_tasks, generator, tasks=None):
        return dataclasses.replace(super().sample(num_tasks, generator, tasks), support_y=torch.zeros(num_tasks))


def test_nan_in_the_data_is_named_as_the_data_s_not_as_a_learning_rate_s(tmp_path):
    """A NaN the task source draws makes the meta-loss NaN: training stops naming the tensor
    and the tasks, not advising a smaller learning rate; evaluate warns of it beside the
    diverged count."""
    from metalearn import Trainer, resolve_config

    tasks = _TasksWithANaN(shots=5, query=5)
    torch.manual_seed(0)
    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 3, "val_every": 0, "meta_batch_size": 4})
    with pytest.raises(MetalearnError) as info:
        Trainer(config, MAML(MLP(1, 1), {"inner_lr": 0.01}), tasks, None, tmp_path / "run").fit(progress=False)
    assert str(info.value).startswith("the meta-loss became nan at step 1: the task source drew NaN or infinite "
                                      "values in support_y (1 task, the first task 0); training stopped")
    assert str(info.value).endswith("is kept. Clean the data, or drop such examples")
    assert "inner_lr" not in str(info.value)
    from metalearn.api import run_status
    from metalearn.cli import format_status
    assert "which a resume repeats: clean the data, or drop such examples" in format_status(run_status(tmp_path / "run"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(MAML(MLP(1, 1)), tasks, 8, progress=False)
    assert result["diverged"] == 1
    assert [str(w.message) for w in caught] == [
        "the task source drew NaN or infinite values in support_y (1 task, the first task 0): an episode whose "
        "score they make non-finite counts as diverged; clean the data, or drop such examples"]
    # a batch without a task axis on its targets is the learner's to refuse, in its one line
    with pytest.raises(MetalearnError, match="maml: support_y must be"):
        evaluate(MAML(MLP(1, 1)), _TasksWithoutATaskAxis(shots=5, query=5), 4, progress=False)


class _TasksTooLarge(SinusoidTasks):
    """Sinusoids whose second task's query targets are finite but beyond what float32 squares."""

    def sample(self, num_tasks, generator, tasks=None):
        batch = super().sample(num_tasks, generator, tasks)
        batch.query_y[1] *= 1e25
        return batch


def test_data_too_large_to_square_is_named_as_the_data_s_not_as_a_learning_rate_s(tmp_path):
    """Finite targets whose squares overflow float32 make the meta-loss infinite whatever the
    learning rates: training names the tensor, the tasks and the largest value, and advises
    rescaling the data (the built-in sinusoid's --noise-std where it is set); status says the
    same; evaluate warns of it."""
    from metalearn import Trainer, resolve_config
    from metalearn.api import run_status, train
    from metalearn.cli import format_status

    torch.manual_seed(0)
    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 3, "val_every": 0, "meta_batch_size": 4})
    tasks = _TasksTooLarge(shots=5, query=5)
    with pytest.raises(MetalearnError) as info:
        Trainer(config, MAML(MLP(1, 1), {"inner_lr": 0.01}), tasks, None, tmp_path / "run").fit(progress=False)
    message = str(info.value)
    assert message.startswith("the meta-loss became inf at step 1: the task source drew values too large to square: "
                              "query_y (1 task, the first task 1) holds values as large as "), message
    assert message.endswith("is kept. Rescale the data, or lower its noise") and "inner_lr" not in message
    assert "which a resume repeats: rescale the data, or lower its noise" in format_status(run_status(tmp_path / "run"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(MAML(MLP(1, 1)), tasks, 8, progress=False)
    assert result["diverged"] == 1  # the second task
    assert [str(w.message) for w in caught][0].startswith(
        "the task source drew values too large to square: query_y (1 task, the first task 1) holds values as large")
    # the built-in's own noise: named by its option
    with pytest.raises(MetalearnError,
                       match=r"values as large as .*is kept\. Rescale the data, or lower the noise \(noise_std\)$"):
        train(resolve_config("maml", task={"dataset": "sinusoid", "noise_std": 1e30},
                             train={"steps": 2, "val_every": 0}), tmp_path / "noise", progress=False, announce=None)


def test_scoring_a_run_s_validation_episodes_as_its_test_is_said(tmp_path):
    """Each part's episodes come from the seed plus the part's offset: a sinusoid run trained with
    seed 1,000,000 validated on exactly the tasks that eval's default seed 0 scores as its test
    (one task family for every part), so those chose its best checkpoints. Evaluate and compare
    say so; another seed, or a run of seed 0, scores without the warning."""
    from metalearn import resolve_config
    from metalearn.api import evaluate_run
    from metalearn.uncertainty import compare_learners
    from metalearn.errors import MetalearnWarning
    from metalearn.training import TEST_SEED_OFFSET, VALIDATION_SEED_OFFSET, build_trainer

    assert 1_000_000 + VALIDATION_SEED_OFFSET == 0 + TEST_SEED_OFFSET  # the collision, as the offsets make it
    for seed, name, val_every in ((1_000_000, "late", 1), (0, "plain", 1), (1_000_000, "unvalidated", 0)):
        config = resolve_config("maml", task={"dataset": "sinusoid"},
                                train={"steps": 1, "val_every": val_every, "val_episodes": 2, "keep_best": val_every,
                                       "meta_batch_size": 2, "seed": seed})
        build_trainer(config, tmp_path / name).fit(progress=False)
    message = (f"these test episodes are the validation episodes of the run in {tmp_path / 'late'} (trained with seed "
               "1000000; its task family is one for every part), which chose its best checkpoints")
    with pytest.warns(MetalearnWarning, match=re.escape(message)):
        evaluate_run(tmp_path / "late", episodes=4, progress=False)
    with pytest.warns(MetalearnWarning, match="are the validation episodes of the run"):
        compare_learners({"late": tmp_path / "late", "plain": tmp_path / "plain"}, episodes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_run(tmp_path / "late", episodes=4, seed=1, progress=False)
        evaluate_run(tmp_path / "plain", episodes=4, progress=False)
        evaluate_run(tmp_path / "unvalidated", episodes=4, progress=False)  # no episodes of it chose anything


def test_evaluate_on_the_cpu_leaves_cuda_alone(monkeypatch):
    """fork_rng without devices starts CUDA to save every GPU's random state (and warns with
    two or more): a CPU evaluation on a GPU machine, at every validation, did so. Simulated
    with two GPUs that CUDA has not started: evaluate touches no GPU's random state."""
    touched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *args, **kwargs: touched.append(args))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *args, **kwargs: touched.append(args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(MAML(MLP(1, 1)), SinusoidTasks(shots=5, query=5), 4, progress=False)
    assert touched == []
