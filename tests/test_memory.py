"""Memory Module (Kaiser et al. 2017): the update rule, the loss, learning, resume, ranks, errors."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from checkpoints import interrupted_and_resumed
from cli_runner import run
from metalearn.algorithms import build_learner
from metalearn.algorithms.memory import (EMPTY, Memory, MemoryConfig, class_rounds, lifelong_accuracy,
                                         look_up, update_memory)
from metalearn.api import resolve_config
from metalearn.config import TaskConfig
from metalearn.errors import ConfigError, MetalearnError
from metalearn.tasks import build_task_source, problem_of
from metalearn.tasks.batch import Problem, TaskBatch

OMNIGLOT = Problem((1, 28, 28), 5, True)
SMALL = {"model": "conv4-embedding", "memory_size": 64, "choose_k": 8, "key_dim": 16}


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def memory_of(keys, values, ages) -> Memory:
    keys = torch.as_tensor(keys, dtype=torch.float64)
    return Memory(keys.unsqueeze(0), torch.tensor([values]), torch.tensor([ages], dtype=torch.float64))


def write(memory, query, value, noise=None):
    query = torch.as_tensor(query, dtype=torch.float64).reshape(1, -1, memory.keys.shape[-1])
    values = torch.tensor([value]).reshape(1, -1)
    noise = torch.zeros_like(memory.ages) if noise is None else torch.tensor([noise], dtype=torch.float64)
    return update_memory(memory, query, values, noise)


# -- the update rule ---------------------------------------------------------------------------


def test_a_hit_averages_and_renormalises_the_nearest_key_and_resets_its_age():
    memory = memory_of([[1.0, 0.0], [0.0, 1.0], [0, 0], [0, 0]], [0, 1, EMPTY, EMPTY], [3, 5, 0, 0])
    after = write(memory, [[0.6, 0.8]], [1])  # nearest: slot 1 (0.8 > 0.6), value 1: a hit
    expected = torch.tensor([0.6, 1.8], dtype=torch.float64) / math.sqrt(0.6**2 + 1.8**2)
    torch.testing.assert_close(after.keys[0, 1], expected)
    torch.testing.assert_close(after.keys[0, 0], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert after.values.tolist() == [[0, 1, EMPTY, EMPTY]]
    assert after.ages.tolist() == [[4, 0, 1, 1]]


def test_a_miss_takes_an_empty_slot_first_then_the_oldest_with_noise():
    memory = memory_of([[1.0, 0.0], [0.0, 1.0], [0, 0], [0, 0]], [0, 1, EMPTY, EMPTY], [3, 50, 0, 0])
    after = write(memory, [[0.6, 0.8]], [2], noise=[0, 0, 0.5, 0.1])  # value 2: a miss; empty slot 2
    assert after.values.tolist() == [[0, 1, 2, EMPTY]]
    torch.testing.assert_close(after.keys[0, 2], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert after.ages.tolist() == [[4, 51, 0, 1]]

    full = memory_of([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], [0, 1, 2], [2, 7, 4])
    assert write(full, [[-1.0, 0.0]], [3]).values.tolist() == [[0, 3, 2]]  # the oldest: slot 1
    # noise in [-age_noise, age_noise] can make a younger slot the one to go: 4 + 3.5 > 7
    assert write(full, [[-1.0, 0.0]], [3], noise=[0, 0, 3.5]).values.tolist() == [[0, 1, 3]]


def test_ages_after_a_sequence_of_queries():
    memory = memory_of(torch.zeros(3, 2), [EMPTY] * 3, [0, 0, 0])
    noise = [0.3, 0.2, 0.1]
    memory = write(memory, [[1.0, 0.0]], [0], noise)  # miss -> empty slot 0 (largest noise)
    assert memory.ages.tolist() == [[0, 1, 1]]
    memory = write(memory, [[0.0, 1.0]], [1], noise)  # miss -> empty slot 1
    assert memory.ages.tolist() == [[1, 0, 2]]
    memory = write(memory, unit([1.0, 0.1]).tolist(), [0], noise)  # hit on slot 0
    assert memory.ages.tolist() == [[0, 1, 3]]
    memory = write(memory, unit([-1.0, -1.0]).tolist(), [2], noise)  # miss -> the last empty slot
    assert memory.ages.tolist() == [[1, 2, 0]] and memory.values.tolist() == [[0, 1, 2]]
    memory = write(memory, unit([-1.0, 0.2]).tolist(), [3], noise)  # full: the oldest, slot 1 (2 + 0.2)
    assert memory.ages.tolist() == [[2, 0, 1]] and memory.values.tolist() == [[0, 3, 2]]


def test_a_batch_update_equals_one_by_one_when_no_write_changes_a_later_lookup():
    generator = torch.Generator().manual_seed(0)
    dim, slots = 16, 12
    stored = F.normalize(torch.randn(6, dim, generator=generator, dtype=torch.float64), dim=-1)
    keys = torch.cat([stored, torch.zeros(slots - 6, dim, dtype=torch.float64)])
    memory = memory_of(keys, list(range(6)) + [EMPTY] * (slots - 6), [9, 3, 7, 1, 8, 2] + [0] * (slots - 6))
    # hits: near slots 1 and 4 with their values; misses: new values (into the empty slots, then
    # with the memory full the oldest) -- none near another query of the batch
    hits = F.normalize(stored[[1, 4]] + 0.1 * torch.randn(2, dim, generator=generator, dtype=torch.float64), dim=-1)
    misses = F.normalize(torch.randn(8, dim, generator=generator, dtype=torch.float64), dim=-1)
    queries = torch.cat([hits[:1], misses[:4], hits[1:], misses[4:]])
    values = [1, 10, 11, 12, 13, 4, 14, 15, 16, 17]
    batch = write(memory, queries, values)
    one_by_one = memory
    for query, value in zip(queries, values):
        one_by_one = write(one_by_one, query.unsqueeze(0), [value])
    torch.testing.assert_close(batch.keys, one_by_one.keys)
    assert batch.values.tolist() == one_by_one.values.tolist()
    # ages: a batch is one step of the memory's clock, its written slots at 0, all others one older
    written = batch.values[0] != memory.values[0]
    written[[1, 4]] = True  # the hits
    assert batch.ages[0].tolist() == torch.where(written, 0.0, memory.ages[0] + 1).tolist()
    # the full memory lost its oldest: slot 0 (age 9 + 1 writes before) and slot 2 (age 7)
    assert 0 not in batch.values.tolist()[0] and 2 not in batch.values.tolist()[0]


def test_a_batch_reads_the_memory_as_it_was_before_the_batch():
    # query b's nearest slot is slot 0 (its value 3) before the batch; one by one, the batch's
    # first write (a, value 9, next to b) would come nearer and make b a miss
    memory = memory_of([[1.0, 0.0], [0, 0], [0, 0], [0, 0]], [3, EMPTY, EMPTY, EMPTY], [0, 0, 0, 0])
    a, b = unit([0.6, 0.8]), unit([0.62, 0.78])
    batch = write(memory, torch.cat([a, b]), [9, 3], noise=[0, 0.3, 0.2, 0.1])
    assert batch.values.tolist() == [[3, 9, EMPTY, EMPTY]]  # b merged into slot 0, a took slot 1
    torch.testing.assert_close(batch.keys[0, 0], F.normalize(b[0] + torch.tensor([1.0, 0.0], dtype=torch.float64), dim=0))
    one_by_one = write(write(memory, a, [9], [0, 0.3, 0.2, 0.1]), b, [3], [0, 0.3, 0.2, 0.1])
    assert one_by_one.values.tolist() == [[3, 9, 3, EMPTY]]  # b a miss: written apart


# -- the loss ------------------------------------------------------------------------------------


def memory_with_similarities(similarities, values, ages=None):
    """Keys whose cosine with the query e_0 are ``similarities``."""
    s = torch.tensor(similarities, dtype=torch.float64)
    keys = torch.stack([s, (1 - s**2).sqrt()], dim=-1)
    return memory_of(keys, values, ages or [0] * len(values))


@pytest.mark.parametrize("value, positive, negative", [
    (1, 0.8, 0.9),   # positive and negative among the top 3
    (3, 0.3, 0.9),   # no positive in the top 3: the most recent slot of value 3 (slot 5, age 1)
    (4, 0.0, 0.9),   # no slot of value 4 at all: positive similarity 0
])
def test_loss_picks_the_positive_and_negative_among_the_top_k(value, positive, negative):
    memory = memory_with_similarities([0.9, 0.8, 0.7, 0.5, 0.2, 0.3], [2, 1, 2, 1, 3, 3], [0, 0, 0, 0, 6, 1])
    query = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    found = look_up(memory, query, torch.tensor([[value]]), choose_k=3, margin=0.1)
    assert found.positive.item() == pytest.approx(positive)
    assert found.negative.item() == pytest.approx(negative)
    assert found.loss.item() == pytest.approx(max(0.0, negative - positive + 0.1))
    assert found.prediction.item() == 2 and found.nearest.item() == 0


def test_loss_without_a_negative_counts_it_as_zero_and_the_margin_is_a_hinge():
    memory = memory_with_similarities([0.9, 0.8, 0.05], [2, 1, 1])
    query = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    found = look_up(memory, query, torch.tensor([[2]]), choose_k=1, margin=0.1)
    assert found.negative.item() == 0.0 and found.loss.item() == 0.0  # 0 - 0.9 + 0.1 < 0
    found = look_up(memory, query, torch.tensor([[1]]), choose_k=2, margin=0.25)
    assert found.loss.item() == pytest.approx(0.9 - 0.8 + 0.25)


def test_gradients_reach_the_query_and_never_the_keys():
    memory = memory_with_similarities([0.9, 0.8, 0.7], [2, 1, 2])
    keys = memory.keys.clone().requires_grad_(True)
    memory = Memory(keys, memory.values, memory.ages)
    query = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    look_up(memory, query, torch.tensor([[1]]), choose_k=3, margin=0.1).loss.sum().backward()
    assert keys.grad is None
    # d/dq (q.k_neg - q.k_pos + margin) = k_neg - k_pos
    torch.testing.assert_close(query.grad[0, 0], memory.keys[0, 0].detach() - memory.keys[0, 1].detach())


def test_the_method_trains_the_network_and_projection_not_the_memory():
    torch.manual_seed(0)
    learner = build_learner("memory", SMALL, OMNIGLOT)
    batch = random_batch(tasks=2, ways=5, shots=1, query=2)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    names = {name for name, p in learner.named_parameters()}
    assert "query_projection.weight" in names and all(not n.startswith("memory") for n in names)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    buffers = dict(learner.named_buffers())
    assert not any(b.requires_grad for b in buffers.values())
    assert int((buffers["memory_values"] != EMPTY).sum()) > 0  # the step's memory is kept


def random_batch(tasks, ways, shots, query, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = lambda n: torch.arange(ways).repeat_interleave(n).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, 28, 28, generator=generator), labels(shots),
                     torch.rand(tasks, ways * query, 1, 28, 28, generator=generator), labels(query), ways=ways)


def test_class_rounds_show_each_class_once_per_round():
    order = class_rounds(torch.tensor([[1, 0, 1, 0, 2]]), 3)
    assert order.tolist() == [[[1, 0, 4], [3, 2, -1]]]


def test_predict_scores_classes_by_their_nearest_key():
    torch.manual_seed(0)
    learner = build_learner("memory", {**SMALL, "dropout": 0.0}, OMNIGLOT).eval()
    batch = random_batch(tasks=3, ways=5, shots=2, query=3)
    logits = learner.predict(batch)
    assert logits.shape == (3, 15, 5) and torch.isfinite(logits).all()
    # query = support: its own class has a key of similarity 1 at least, for 1-shot
    same = TaskBatch(batch.support_x[:, ::2], batch.support_y[:, ::2], batch.support_x[:, ::2],
                     batch.support_y[:, ::2], ways=5)
    logits = learner.predict(same)
    assert (logits.argmax(-1) == same.query_y).all()
    torch.testing.assert_close(logits.amax(-1), torch.full((3, 5), learner.config.temperature))


# -- on Omniglot ---------------------------------------------------------------------------------


def test_a_short_omniglot_run_learns_far_above_chance(omniglot_data_dir):
    torch.manual_seed(0)
    task = TaskConfig(split="vinyals", ways=5, shots=1, query=1)
    train = build_task_source(task, "train", data_dir=omniglot_data_dir, progress=False)
    test = build_task_source(task, "test", data_dir=omniglot_data_dir, progress=False)
    learner = build_learner("memory", {**SMALL, "dropout": 0.0}, problem_of(task))
    test_batch = test.sample(40, torch.Generator().manual_seed(1))

    def accuracy():
        learner.eval()
        return float((learner.predict(test_batch).argmax(-1) == test_batch.query_y).float().mean())

    before = accuracy()
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    learner.train()
    for _ in range(15):
        loss, _ = learner.meta_loss(train.sample(4, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy()
    assert after > 0.5 and after > before + 0.1, (before, after)  # chance: 0.2
    lifelong = build_task_source(TaskConfig(split="vinyals", ways=5, shots=2, query=1), "test",
                                 data_dir=omniglot_data_dir, progress=False)
    result = lifelong_accuracy(learner, lifelong, episodes=10, max_shot=2)
    assert result["k_shot"][0] == 0.0  # a class's first showing finds no key of its value
    assert result["k_shot"][1] > 40 and result["episodes"] == 10


def test_the_default_episodes_are_the_authors_5_classes_of_6_examples():
    """Unless told otherwise, the Memory Module trains on the authors' episodes (train.py's
    width 5, length 30): 1 + 5 showings per class, where 1 + 1 would leave half without gradient."""
    task = resolve_config("memory", task={"dataset": "omniglot"}).task
    assert (task.split, task.ways, task.shots, task.query) == ("vinyals", 5, 1, 5)
    given = resolve_config("memory", task={"dataset": "omniglot", "split": "maml", "shots": 2, "query": 1}).task
    assert (given.split, given.shots, given.query) == ("maml", 2, 1)
    # the authors' episodes are Omniglot's: another dataset keeps its own (mini-ImageNet's 15 queries)
    other, protonet = (resolve_config(method, task={"dataset": "mini-imagenet"}).task
                       for method in ("memory", "protonet"))
    assert (other.shots, other.query) == (protonet.shots, protonet.query) == (1, 15)


def test_resume_is_exact_with_the_memory_and_its_noise(tmp_path, omniglot_data_dir):
    from metalearn.training import build_trainer

    config = resolve_config("memory", task={"dataset": "omniglot", "ways": 3, "shots": 1, "query": 2},
                            method_config={**SMALL, "memory_size": 16, "dropout": 0.5},
                            train={"steps": 4, "meta_batch_size": 2, "val_every": 0, "checkpoint_every": 2})
    straight = build_trainer(config, tmp_path / "a", data_dir=omniglot_data_dir)
    straight.fit(progress=False)
    resumed = interrupted_and_resumed(
        lambda **resume: build_trainer(config, tmp_path / "b", data_dir=omniglot_data_dir, **resume))
    final, expected = resumed.learner.state_dict(), straight.learner.state_dict()
    assert {"memory_keys", "memory_values", "memory_ages", "age_noise_state"} <= set(final)
    for name, value in expected.items():
        assert torch.equal(value, final[name]), name
    # 2 tasks x 3 classes x 3 examples = 18 writes into 16 slots: the noise chose which to reuse
    assert int((final["memory_values"] != EMPTY).sum()) == 16


def test_two_gloo_ranks_hold_the_memory_of_one_process(tmp_path, omniglot_data_dir):
    from checkpoints import assert_same_weights, weights
    from launching import launch, metalearn

    args = ["memory", "--dataset", "omniglot", "--ways", 3, "--shots", 1, "--query", 2, "--model",
            "conv4-embedding", "--memory-size", 32, "--choose-k", 8, "--key-dim", 16, "--dropout", 0,
            "--meta-batch-size", 3, "--steps", 2, "--val-every", 0, "--no-eval", "--no-progress",
            "--data-dir", omniglot_data_dir]
    metalearn(args + ["--run-dir", tmp_path / "one"], tmp_path)
    launch(["-m", "metalearn", "train", *map(str, args + ["--run-dir", tmp_path / "two"])])
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert torch.equal(one["memory_values"], two["memory_values"])  # the same writes, in the same slots
    assert torch.equal(one["memory_ages"], two["memory_ages"])
    assert int((one["memory_values"] != EMPTY).sum()) > 9  # tasks of both ranks are in it


# -- bad input -------------------------------------------------------------------------------------


def test_bad_options_are_refused_with_the_field_named():
    with pytest.raises(ConfigError, match=r"MemoryModule.Config.choose_k must be at most MemoryModule.Config.memory_size \(128\)"):
        MemoryConfig(memory_size=128, choose_k=256)
    learner = build_learner("memory", {**SMALL, "memory_size": 8, "choose_k": 4}, OMNIGLOT)
    with pytest.raises(ConfigError, match=r"memory_size must hold one episode's support set \(10 examples\), got 8"):
        learner.meta_loss(random_batch(tasks=1, ways=5, shots=2, query=1))
    with pytest.raises(MetalearnError, match="its 8 slots cannot take one round of a 10-way episode"):
        learner.predict(random_batch(tasks=1, ways=10, shots=1, query=1))
    with pytest.raises(ConfigError, match="model must be an image network: lenet .*conv4-embedding.*got 'lenett'"):
        MemoryConfig(model="lenett")
    # the margin is a float32 number, as the other scales: not beyond float32, nor lost to rounding
    with pytest.raises(ConfigError, match=r"^MemoryModule.Config.margin must be a finite number > 0 and at most "
                                          r"3.403e\+38 \(float32's largest\), got 1e\+40$"):
        MemoryConfig(margin=1e40)
    with pytest.raises(ConfigError, match=r"^MemoryModule.Config.margin must be at least 1.175e-38 \(float32's "
                                          r"smallest normal number; a smaller one loses its precision or becomes "
                                          r"0\), got 1e-320$"):
        MemoryConfig(margin=1e-320)
    with pytest.raises(ConfigError, match=r"^MemoryModule.Config.margin must be a finite number > 0, got nan$"):
        MemoryConfig(margin=float("nan"))


def test_a_network_of_another_width_than_the_projection_is_refused_in_one_line():
    """MemoryModule(model, embedding_dim) built for another width than the network's output
    would fail inside the projection's matmul; it is refused, naming the width to give."""
    from metalearn.algorithms.memory import MemoryModule
    from metalearn.models import Conv4
    learner = MemoryModule(Conv4(1, None, hidden=8), embedding_dim=32, config=MemoryConfig(**SMALL))
    batch = random_batch(tasks=1, ways=5, shots=1, query=1)
    for call in (learner.meta_loss, learner.predict):
        with pytest.raises(MetalearnError, match=r"^memory: the embedding network's output has 8 features but "
                                                 r"embedding_dim is 32; give embedding_dim=8"):
            call(batch)


def test_a_test_support_set_larger_than_the_memory_replaces_the_oldest_keys():
    """5-way 2-shot (10 examples) into 8 slots: the first round's keys stay, of the second the
    first three writes take the free slots and the other two replace the oldest (slots 0, 1)."""
    from metalearn.algorithms.memory import write_support

    basis = torch.eye(16)[:5]
    keys = torch.cat([basis, basis.roll(1, 0)]).unsqueeze(0)  # round 1: class c along class c-1's key, a miss
    labels = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    learner = build_learner("memory", {**SMALL, "memory_size": 8, "choose_k": 4}, OMNIGLOT)
    batch = random_batch(tasks=2, ways=5, shots=2, query=1)
    logits = learner.predict(batch)
    assert logits.shape == (2, 5, 5) and torch.isfinite(logits).all()
    memory = write_support(keys, labels, 5, slots=8)
    assert memory.values.tolist() == [[3, 4, 2, 3, 4, 0, 1, 2]]
    assert memory.keys[0].argmax(-1).tolist() == [2, 3, 2, 3, 4, 4, 0, 1]
    full = write_support(keys, labels, 5)  # a slot per example: nothing replaced
    assert full.values.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]


def test_the_command_line_refuses_bad_memory_options_in_one_line(tmp_path, capsys, omniglot_data_dir):
    code, _, err = run(["train", "memory", "--choose-k", 300, "--memory-size", 256, "--run-dir", tmp_path / "r"], capsys)
    # the field or its flag, as the command line renders a ConfigError
    assert code == 2 and err.strip().count("\n") == 0
    assert re.search(r"(--choose-k|choose_k) must be at most (--memory-size|\S*memory_size) \(256\), got 300", err)
    code, _, err = run(["train", "memory", "--ways", 5, "--shots", 2, "--memory-size", 8, "--choose-k", 4, "--meta-batch-size", 1, "--model",
                        "conv4-embedding", "--steps", 1, "--no-progress", "--run-dir", tmp_path / "s",
                        "--data-dir", omniglot_data_dir], capsys)
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0
    assert re.search(r"(--memory-size|memory_size) must hold one training episode's support set \(5 x 2\) = 10 slots, "
                     r"got 8", err)
    assert not (tmp_path / "s" / "config.json").exists()  # refused before the run folder is written
    # a test shape the memory cannot take is refused before training too, not after it
    code, _, err = run(["train", "memory", "--ways", 3, "--shots", 1, "--test-ways", 20, "--memory-size", 16,
                        "--choose-k", 4, "--model", "conv4-embedding", "--meta-batch-size", 2, "--steps", 1,
                        "--no-progress", "--run-dir", tmp_path / "t", "--data-dir", omniglot_data_dir], capsys)
    assert code == 2 and "one round of a test episode (20 classes) = 20 slots, got 16" in err, err
    assert not (tmp_path / "t" / "config.json").exists()


def test_a_checkpoint_of_another_memory_size_is_refused(tmp_path, capsys, omniglot_data_dir):
    code, _, err = run(["train", "memory", "--ways", 3, "--shots", 1, "--query", 1, "--memory-size", 16, "--choose-k", 4,
                        "--key-dim", 8, "--model", "conv4-embedding", "--steps", 1, "--meta-batch-size", 1, "--val-every", 0,
                        "--no-eval", "--no-progress", "--run-dir", tmp_path / "r", "--data-dir", omniglot_data_dir], capsys)
    assert code == 0, err
    code, _, err = run(["eval", tmp_path / "r", "--set", "memory_size=32", "--episodes", 2,
                        "--data-dir", omniglot_data_dir], capsys)
    # metalearn eval takes method options as --set alone: its advice names them so, never train's flags
    assert err == ("error: --set memory_size is 32 but the checkpoint's memory has 16 slots, which it keeps: leave "
                   "--set memory_size at the run's 16\n"), err
    code, _, err = run(["eval", tmp_path / "r", "--set", "memory_size=2", "--episodes", 2,
                        "--data-dir", omniglot_data_dir], capsys)  # below the run's choose_k (4)
    assert code == 2 and err == "error: --set choose_k must be at most --set memory_size (2), got 4\n", err
    code, _, err = run(["eval", tmp_path / "r", "--set", "choose_k=40", "--episodes", 2,
                        "--data-dir", omniglot_data_dir], capsys)  # above the run's memory_size (16)
    assert code == 2 and err == "error: --set choose_k must be at most --set memory_size (16), got 40\n", err


def test_the_lifelong_protocol_runs_on_the_episode_shape_asked_for(tmp_path, capsys, omniglot_data_dir):
    code, _, err = run(["train", "memory", "--ways", 3, "--shots", 1, "--query", 1, "--memory-size", 16, "--choose-k", 4,
                        "--key-dim", 8, "--model", "conv4-embedding", "--steps", 1, "--meta-batch-size", 1, "--val-every", 0,
                        "--no-eval", "--no-progress", "--run-dir", tmp_path / "r", "--data-dir", omniglot_data_dir], capsys)
    assert code == 0, err
    code, out, err = run(["eval", tmp_path / "r", "--protocol", "lifelong", "--ways", 4, "--query", 2, "--episodes", 3,
                          "--no-progress", "--data-dir", omniglot_data_dir], capsys)
    assert code == 0, err
    written = tmp_path / "r" / "eval-episodes=3-protocol=lifelong-query=2-ways=4.json"
    assert f"written to {written}" in out
    assert err == "evaluating the checkpoint of step 1 by the lifelong protocol on 3 test episodes...\n", err
    result = json.loads(written.read_text())
    # 4 classes shown 1 + 2 times each: 0- to 2-shot scored, 3- to 5-shot absent
    assert (result["episode_width"], result["episode_length"], result["episodes"]) == (4, 12, 3)
    assert result["k_shot"][0] == 0.0 and result["k_shot"][3:] == [None] * 3 and result["k_shot_ci95"][3:] == [None] * 3
    assert all(0 <= v <= 100 for v in result["k_shot"][1:3]) and len(result["k_shot_ci95"]) == 6
    # a protocol scores one checkpoint: --ensemble with it is refused, nothing written
    code, _, err = run(["eval", tmp_path / "r", "--protocol", "lifelong", "--ensemble", "--no-progress",
                        "--data-dir", omniglot_data_dir], capsys)
    assert code == 2 and "--protocol lifelong evaluates one checkpoint" in err
    assert not list((tmp_path / "r").glob("eval-ensemble*"))


@pytest.mark.parametrize("given", [{"episodes": 0}, {"episodes": -2}, {"episodes": 1.5}, {"chunk": 0}, {"chunk": -1},
                                   {"max_shot": -1}, {"max_shot": 2.0}])
def test_the_lifelong_protocol_refuses_bad_counts_in_one_line(given):
    """No episode would end in torch.cat of nothing, a chunk of 0 in a batch of no tasks: the
    counts are refused as evaluate refuses them, before any episode is drawn."""
    class Source:
        drawn = []

        def sample(self, size, generator, tasks=None):
            self.drawn.append(size)
            labels = torch.arange(3).repeat(size, 2)  # 3 classes shown twice: 1 shot + 1 query
            return TaskBatch(torch.rand(size, 3, 1, 28, 28), labels[:, :3], torch.rand(size, 3, 1, 28, 28),
                             labels[:, 3:], ways=3)

    learner, source = build_learner("memory", SMALL, Problem((1, 28, 28), 3, True)), Source()
    name = next(iter(given))
    least = 0 if name == "max_shot" else 1
    with pytest.raises(MetalearnError, match=f"lifelong_accuracy: {name} must be a whole number of at least {least}, "
                                             "got ") as error:
        lifelong_accuracy(learner, source, **given)
    assert "\n" not in str(error.value) and source.drawn == []
    result = lifelong_accuracy(learner, source, episodes=3, chunk=2, max_shot=1)
    assert source.drawn == [2, 1] and result["episodes"] == 3 and len(result["k_shot"]) == 2


def load_script(name: str):
    """A script of scripts/ as a module, its main() not run."""
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / name), run_name="script")


def test_the_reproduction_script_says_which_wall_times_it_knows(tmp_path, capsys, omniglot_data_dir, monkeypatch):
    """scripts/memory-reproduction.py: "with training" is the run's own eval.json alone; an
    evaluation that `metalearn eval` wrote (no time recorded) is "—", one the script ran its seconds,
    also when a second call reuses it."""
    import sys

    run_dir, out = tmp_path / "r", tmp_path / "out"
    code, _, err = run(["train", "memory", "--ways", 5, "--shots", 1, "--query", 1, "--memory-size", 24,
                        "--choose-k", 4, "--key-dim", 8, "--model", "conv4-embedding", "--steps", 1,
                        "--meta-batch-size", 1, "--val-every", 0, "--eval-episodes", 2, "--no-progress",
                        "--run-dir", run_dir, "--data-dir", omniglot_data_dir], capsys)
    assert code == 0, err
    code, _, err = run(["eval", run_dir, "--ways", 20, "--shots", 5, "--no-progress", "--data-dir", omniglot_data_dir],
                       capsys)
    assert code == 0 and (run_dir / "eval-shots=5-ways=20.json").exists(), err
    # the shape in its own fields; overrides holds the method's options (--set) alone
    saved = json.loads((run_dir / "eval-shots=5-ways=20.json").read_text())
    assert (saved["ways"], saved["shots"], saved["overrides"]) == (20, 5, {})
    script = load_script("memory-reproduction.py")

    def table() -> dict[str, str]:
        monkeypatch.setattr(sys, "argv", ["memory-reproduction.py", str(run_dir), str(out), "--data-dir",
                                          str(omniglot_data_dir)])
        script["main"]()
        printed = capsys.readouterr().out.splitlines()
        rows = [line.split(" | ") for line in printed if re.match(r"\| \d+-way \d+-shot", line)]
        return {row[0].lstrip("| "): row[-1].rstrip(" |") for row in rows}

    first = table()
    assert first["5-way 1-shot"] == "with training" and first["20-way 5-shot"] == "—"
    for computed in ("5-way 5-shot", "20-way 1-shot"):
        assert re.fullmatch(r"\d+ s", first[computed]), first
    assert table() == first  # reused: the times the script recorded, "—" still for what it did not time
    assert json.loads((out / "lifelong.json").read_text())["20-way"]["episode_width"] == 20
    assert script["wall_cell"](None) == "—" and script["wall_cell"](None, own=True) == "with training"
    assert script["shot_cell"](None) == "n/a" and script["shot_cell"](97.123, 0.4) == "97.12 ± 0.40"
