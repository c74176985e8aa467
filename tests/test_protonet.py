"""Prototypical Networks: prototypes, distances and logits against hand-computed values, the
batched meta-gradient against a per-task reference, per-task batch statistics, learning on
Omniglot, and the trainer / evaluator / CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms import METHODS, build_learner
from metalearn.algorithms.protonet import (ProtoNet, class_prototypes, embed_episodes, similarities,
                                           squared_distances)
from metalearn.api import evaluate_run, resolve_config, train
from metalearn.errors import MetalearnError
from metalearn.models import Conv4
from metalearn.tasks.batch import Problem, TaskBatch

from batches import image_batch
from learning import held_out_accuracy_before_and_after


pytestmark = pytest.mark.usefixtures("one_thread")


def points_batch() -> TaskBatch:
    """Two tasks of 2-d points (the identity is the embedding). Task 0: class 0 at (0,0), (2,0)
    -> prototype (1,0); class 1 at (0,2), (0,4) -> (0,3); the support is not sorted by class.
    Task 1: 3 shots of class 0 and 1 of class 1 (unequal shots)."""
    support_x = torch.tensor([
        [[0.0, 2.0], [0.0, 0.0], [0.0, 4.0], [2.0, 0.0]],
        [[1.0, 1.0], [3.0, 3.0], [2.0, -1.0], [-4.0, 0.0]],
    ])
    support_y = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]])
    query_x = torch.tensor([
        [[1.0, 1.0], [0.0, 4.0], [3.0, 0.0]],
        [[2.0, 1.0], [-3.0, 1.0], [0.0, 0.0]],
    ])
    query_y = torch.tensor([[0, 1, 0], [0, 1, 1]])
    return TaskBatch(support_x, support_y, query_x, query_y, ways=2)


def test_prototypes_distances_and_logits_by_hand():
    batch = points_batch()
    protonet = ProtoNet(nn.Identity())
    prototypes = class_prototypes(batch.support_x, batch.support_y, 2)
    # task 1: class 0 = mean of (1,1), (3,3), (2,-1) = (2,1); class 1 = (-4,0)
    expected_prototypes = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[2.0, 1.0], [-4.0, 0.0]]])
    torch.testing.assert_close(prototypes, expected_prototypes)

    # ||q - c_k||^2 by hand, e.g. task 0 query (1,1): to (1,0) 0+1 = 1, to (0,3) 1+4 = 5
    expected_distances = torch.tensor([
        [[1.0, 5.0], [17.0, 1.0], [4.0, 18.0]],
        [[0.0, 37.0], [25.0, 2.0], [5.0, 16.0]],
    ])
    torch.testing.assert_close(squared_distances(batch.query_x, prototypes), expected_distances)
    logits = protonet.predict(batch)
    torch.testing.assert_close(logits, -expected_distances)

    loss, metrics = protonet.meta_loss(batch)
    by_hand = [-(-d[y]) + math.log(sum(math.exp(-v) for v in d))  # -log softmax(-d)[y]
               for task, labels in zip(expected_distances.tolist(), batch.query_y.tolist())
               for d, y in zip(task, labels)]
    assert float(loss) == pytest.approx(sum(by_hand) / 6, rel=1e-6)
    # predictions: task 0 -> 0, 1, 0 (all right); task 1 -> 0, 1, 0 (last wrong)
    assert float(metrics["accuracy"]) == pytest.approx(5 / 6)


def test_cosine_logits_by_hand():
    query = torch.tensor([[[3.0, 4.0]]])
    prototypes = torch.tensor([[[1.0, 0.0], [0.0, -2.0], [-1.0, -1.0]]])
    expected = torch.tensor([[[0.6, -0.8, -7.0 / (5 * math.sqrt(2))]]])
    torch.testing.assert_close(similarities(query, prototypes, "cosine"), expected)
    # prototypes (1,0) and (0,3): the query (4,3) is nearer (0,3) but points along (1,0)
    support_x = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]]])
    batch = TaskBatch(support_x, torch.tensor([[0, 0, 1, 1]]), torch.tensor([[[4.0, 3.0]]]), torch.tensor([[0]]), 2)
    cosine = ProtoNet(nn.Identity(), ProtoNet.Config(distance="cosine")).predict(batch)
    torch.testing.assert_close(cosine, torch.tensor([[[0.8, 0.6]]]))
    torch.testing.assert_close(ProtoNet(nn.Identity()).predict(batch), torch.tensor([[[-18.0, -16.0]]]))


def reference_loss(model: nn.Module, batch: TaskBatch) -> torch.Tensor:
    """Per-task Python loop with the plain model (batch statistics of the task's support and
    query images together), torch.cdist for the distances."""
    losses = []
    n_support = batch.support_x.shape[1]
    for t in range(batch.num_tasks):
        z = model(torch.cat([batch.support_x[t], batch.query_x[t]]))
        support, query = z[:n_support], z[n_support:]
        prototypes = torch.stack([support[batch.support_y[t] == k].mean(0) for k in range(batch.ways)])
        losses.append(F.cross_entropy(-torch.cdist(query, prototypes) ** 2, batch.query_y[t]))
    return torch.stack(losses).mean()


def test_meta_gradient_matches_per_task_reference():
    model = Conv4(1, None, hidden=8, pooling="max").double()
    protonet = ProtoNet(model)
    batch = image_batch()
    loss, _ = protonet.meta_loss(batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected_loss = reference_loss(model, batch)
    expected = torch.autograd.grad(expected_loss, list(model.parameters()))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_batch_statistics_are_per_task():
    """A task's predictions do not depend on the other tasks of its batch (the evaluator's
    chunk size), but do depend on its own images (batch norm sees support and query)."""
    protonet = ProtoNet(Conv4(1, None, hidden=8, pooling="max").double())
    batch = image_batch(tasks=4)
    together = protonet.predict(batch)
    for t in range(4):
        alone = protonet.predict(batch.select(slice(t, t + 1)))[0]
        torch.testing.assert_close(together[t], alone, rtol=1e-10, atol=1e-12)
    # embedding the whole batch at once would mix statistics across tasks: other logits
    n_support = batch.support_x.shape[1]
    flat = protonet.model(torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1)).view(4, -1, 8)
    mixed = similarities(flat[:, n_support:], class_prototypes(flat[:, :n_support], batch.support_y, 3))
    assert not torch.allclose(mixed, together, rtol=1e-4, atol=1e-6)
    assert not together.requires_grad


def test_predictions_do_not_depend_on_support_order_or_label_names():
    protonet = ProtoNet(Conv4(1, None, hidden=8, pooling="max").double())
    batch = image_batch(tasks=2)
    logits = protonet.predict(batch)
    order = torch.tensor([5, 0, 3, 1, 4, 2])
    relabel = torch.tensor([2, 0, 1])  # class k is now called relabel[k]
    shuffled = TaskBatch(batch.support_x[:, order], relabel[batch.support_y[:, order]], batch.query_x,
                         relabel[batch.query_y], batch.ways)
    torch.testing.assert_close(protonet.predict(shuffled)[..., relabel], logits, rtol=1e-10, atol=1e-10)


def test_refuses_regression_and_models_with_buffers():
    with pytest.raises(MetalearnError, match="classification"):
        ProtoNet.build(ProtoNet.Config(), Problem((1,), 1, False))
    with pytest.raises(MetalearnError, match="buffers"):
        ProtoNet(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4)))
    with pytest.raises(MetalearnError, match="ProtoNet.Config.distance"):
        ProtoNet.Config(distance="manhattan")


def test_a_class_without_support_examples_is_refused():
    """Its prototype would be 0/0 (NaN logits, or for an identity embedding a prototype at the
    origin): the episode is refused instead. Task 1 of the batch lost its one class-1 example."""
    batch = points_batch()
    support_y = batch.support_y.clone()
    support_y[1, 3] = 0
    missing = TaskBatch(batch.support_x, support_y, batch.query_x, batch.query_y, ways=2)
    message = "a task has a class without support examples; every class needs at least one shot"
    with pytest.raises(MetalearnError, match=message):
        ProtoNet(nn.Identity()).predict(missing)
    with pytest.raises(MetalearnError, match=message):
        ProtoNet(nn.Identity()).meta_loss(missing)


def test_learns_omniglot_5_way_1_shot(omniglot):
    """240 episodes (60 steps of 4) with a 16-filter Conv4: far above the 20% of chance
    (about 37% untrained, 74% after; 84% after 200 steps)."""
    torch.manual_seed(0)
    protonet = ProtoNet(Conv4(1, None, hidden=16, pooling="max"))
    before, after = held_out_accuracy_before_and_after(protonet, omniglot, steps=60)
    assert after > 0.6 and after > before + 0.2, (before, after)


def test_paper_defaults_and_trainer_end_to_end(tmp_path, omniglot_data_dir):
    config = resolve_config("protonet",
                            task={"dataset": "omniglot", "split": "vinyals", "ways": 10, "shots": 1,
                                  "query": 2, "test_ways": 5, "test_query": 3},
                            train={"steps": 3, "val_every": 2, "val_episodes": 4, "log_every": 1})
    assert config.train.meta_batch_size == 1 and config.train.lr_halve_every == 2000
    assert config.train.eval_episodes == 1000 and config.train.meta_lr == 1e-3
    assert config.method_config == {"distance": "euclidean", "model": "conv4-embedding"}
    run_dir, result = train(config, tmp_path / "run", data_dir=omniglot_data_dir, progress=False,
                            evaluate_after=False, announce=lambda line: None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    validations = [r for r in records if "val_accuracy" in r]
    trained_for = {r["step"]: r["elapsed_s"] for r in records if "loss" in r}
    assert validations and all(r["elapsed_s"] == trained_for[r["step"]] for r in validations)  # wall time axis
    result = evaluate_run(run_dir, episodes=10, data_dir=omniglot_data_dir, progress=False)
    assert result["episodes"] == 10 and result["ways"] == 5 and result["step"] == 3
    assert len(result["per_step"]) == 1 and 0 <= result["mean"] <= 100
    assert json.loads((run_dir / "eval-episodes=10.json").read_text())["method"] == "protonet"


def test_registered_with_cli_options():
    from click.testing import CliRunner

    from metalearn.cli import cli

    assert METHODS["protonet"] is ProtoNet
    learner = build_learner("protonet", {"distance": "cosine"}, Problem((1, 28, 28), 5, True))
    assert learner.config.distance == "cosine"
    assert learner.model(torch.zeros(2, 1, 28, 28)).shape == (2, 64)  # the paper's 64-d embedding
    out = CliRunner().invoke(cli, ["train", "protonet", "--help"]).output
    assert "--distance" in out and "Prototypical Networks" in out


def test_channels_last_float32_embedding_matches_a_plain_forward():
    """``embed_episodes`` runs each task in channels-last layout (a different float32 kernel);
    it must give each task's plain forward pass, and the same gradients."""
    torch.manual_seed(0)
    model = Conv4(1, None, hidden=16, pooling="max")
    batch = image_batch(tasks=2, ways=5, shots=1, query=3, size=28, dtype=torch.float32)
    support, query = embed_episodes(model, batch)
    for t in range(2):
        plain = model(torch.cat([batch.support_x[t], batch.query_x[t]]))
        torch.testing.assert_close(torch.cat([support[t], query[t]]), plain, rtol=1e-4, atol=1e-5)
    ours = torch.autograd.grad(query.sum() + support.square().sum(), list(model.parameters()))
    plain_out = [model(torch.cat([batch.support_x[t], batch.query_x[t]])) for t in range(2)]
    expected = torch.autograd.grad(sum(z[5:].sum() + z[:5].square().sum() for z in plain_out),
                                   list(model.parameters()))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# the methods that compare embeddings: every classification-only method (a new one is checked
# too) but the Neural Statistician, a generative model whose networks take only 28x28 images and
# whose messages speak of images (tests/test_statistician.py checks its batches)
EMBEDDING_METHODS = [name for name, cls in METHODS.items()
                     if cls.classification_only and not cls.reinforcement and name != "statistician"]
# the options that give a method a small network for 16x16 images, where its Config's defaults
# do not (a method not named takes them); the Memory Module's without dropout, so that two
# predictions compare
EMBEDDING_OPTIONS = {"memory": {"model": "conv4-embedding", "dropout": 0.0, "memory_size": 64, "choose_k": 8,
                                "key_dim": 16}}


def embedding_learner(method):
    options = EMBEDDING_OPTIONS.get(method, {})
    try:
        return build_learner(method, options, Problem((1, 16, 16), 3, True))
    except Exception as err:  # a new method that needs options of its own here
        pytest.fail(f"{method} with options {options} cannot be built for 3-way tasks of 1x16x16 images "
                    f"({type(err).__name__}: {err}); give it small options in EMBEDDING_OPTIONS of {__file__}")


@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_a_batch_of_another_floating_point_type_than_the_network_is_one_line(method):
    learner = embedding_learner(method).double()
    float32 = image_batch(2, 3, 1, 1, 16, dtype=torch.float32)
    with pytest.raises(MetalearnError, match=rf"{method}: the batch's inputs are torch.float32 and the "
                                             r"network's weights torch.float64; convert the batch"):
        learner.meta_loss(float32)
    loss, _ = learner.meta_loss(float32.to(torch.float64))
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


def test_fit_predict_of_a_float64_or_bfloat16_learner_takes_its_own_tensors_and_prepared_images():
    """fit_predict builds its batch in the learner's floating-point type: a float64 learner takes
    float64 tensors, bytes and the float32 images prepare_images makes alike, and answers as the
    float32 learner does, in float64; a bfloat16 one answers in float32 (not refused, blaming the
    batch, as when the batch stayed float32)."""
    import copy

    from metalearn.data.images import prepare_images

    pixels = torch.randint(0, 256, (9, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    support, labels, query = pixels[:6], [0, 0, 1, 1, 2, 2], pixels[6:]
    torch.manual_seed(0)
    built = build_learner("protonet", {}, Problem((1, 16, 16), 3, True))  # prepares images (prepare_images)
    direct = ProtoNet(Conv4(1, None, hidden=8, pooling="max"))  # no problem: takes tensors as they are
    for learner in (built, direct):
        expected = learner.fit_predict(support, labels, query)
        assert expected.dtype == torch.float32
        wide, narrow = copy.deepcopy(learner).double(), copy.deepcopy(learner).to(torch.bfloat16)
        for given in (support, support.double() / 255, prepare_images(support, 16, 1)):
            queries = query.double() / 255 if given.dtype == torch.float64 else query
            probabilities = wide.fit_predict(given, labels, queries)
            assert probabilities.dtype == torch.float64
            torch.testing.assert_close(probabilities, expected.double(), rtol=1e-5, atol=1e-6)
            assert wide.task_batch(given, labels, queries).support_x.dtype == torch.float64
        rough = narrow.fit_predict(support, labels, query)
        assert rough.dtype == torch.float32 and rough.shape == (3, 3)
        torch.testing.assert_close(rough.sum(-1), torch.ones(3))


def relabelled(batch: TaskBatch, support_y=None, query_y=None, ways=None) -> TaskBatch:
    return TaskBatch(batch.support_x, batch.support_y if support_y is None else support_y, batch.query_x,
                     batch.query_y if query_y is None else query_y, batch.ways if ways is None else ways)


def with_label(labels: torch.Tensor, value: int) -> torch.Tensor:
    labels = labels.clone()
    labels[0, 0] = value
    return labels


def with_images(batch: TaskBatch, support_x: torch.Tensor, query_x: torch.Tensor) -> TaskBatch:
    return TaskBatch(support_x, batch.support_y, query_x, batch.query_y, batch.ways)


# what a user of the Python API can get wrong in a TaskBatch, and the words of the one-line error
MALFORMED = {
    "support label = ways": (lambda b: relabelled(b, support_y=with_label(b.support_y, 3)),
                             r"support_y has class ids \[3\] outside 0..2, the tasks being 3-way"),
    "query label = ways": (lambda b: relabelled(b, query_y=with_label(b.query_y, 3)),
                           r"query_y has class ids \[3\] outside 0..2"),
    "negative support label": (lambda b: relabelled(b, support_y=with_label(b.support_y, -1)),
                               r"support_y has class ids \[-1\] outside 0..2"),
    "negative query label": (lambda b: relabelled(b, query_y=with_label(b.query_y, -2)),
                             r"query_y has class ids \[-2\] outside 0..2"),
    "query label above the support's (no ways)": (lambda b: relabelled(b, query_y=with_label(b.query_y, 3), ways=0),
                                                  r"query_y has class ids \[3\] outside 0..2( \(or -1: unknown\))?, "
                                                  r"the tasks being 3-way, as the support labels imply"),
    "negative support label (no ways)": (lambda b: relabelled(b, support_y=with_label(b.support_y, -1), ways=0),
                                         r"support_y has negative class ids \[-1\]"),
    "int32 labels": (lambda b: relabelled(b, support_y=b.support_y.int()),
                     r"the batch.s support_y is torch.int32; class ids must be long \(y.long\(\)\)"),
    "uint8 images": (lambda b: with_images(b, (b.support_x * 255).to(torch.uint8), (b.query_x * 255).to(torch.uint8)),
                     r"the batch.s support_x is torch.uint8; inputs must be floating point \(images as 0..255: give "
                     r"x.float\(\) / 255"),
    "query images of another size": (lambda b: with_images(b, b.support_x, b.query_x[..., :12, :12]),
                                     r"support examples have shape \(1, 16, 16\) and query examples \(1, 12, 12\)"),
    "query images of other channels": (lambda b: with_images(b, b.support_x, b.query_x.repeat(1, 1, 3, 1, 1)),
                                       r"support examples have shape \(1, 16, 16\) and query examples \(3, 16, 16\)"),
    "query of another float type": (lambda b: with_images(b, b.support_x, b.query_x.double()),
                                    r"the batch.s support_x is torch.float32 and its query_x torch.float64"),
    "fewer query tasks": (lambda b: TaskBatch(b.support_x, b.support_y, b.query_x[:1], b.query_y[:1], 3),
                          r"the batch.s tensors have different numbers of tasks \(first axis: support_x 2, "
                          r"support_y 2, query_x 1, query_y 1\)"),
    "too few support labels": (lambda b: relabelled(b, support_y=b.support_y[:, :2]),
                               r"support_y has shape \(2, 2\) for support_x of shape \(2, 3, 1, 16, 16\); it "
                               r"needs one class id per example"),
    "too few query labels": (lambda b: relabelled(b, query_y=b.query_y[:, :2]),
                             r"query_y has shape \(2, 2\) for query_x of shape \(2, 3, 1, 16, 16\)"),
    "one task without its task axis": (lambda b: TaskBatch(b.support_x[0], b.support_y[0], b.query_x[0], b.query_y[0],
                                                           3),
                                       r"support_y must be \(tasks, examples\), got shape \(3,\); a single task needs "
                                       r"a leading axis of 1"),
}


@pytest.mark.parametrize("case", MALFORMED)
@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_a_malformed_batch_is_refused_in_one_line(method, case):
    """Through the Python API (``meta_loss``, ``predict``), a batch that breaks TaskBatch's
    contract is refused with the project's error in one line naming the method, not with an
    error from inside torch (``one_hot``, ``cross_entropy``, ``cat``, a convolution)."""
    learner = embedding_learner(method)
    good = image_batch(tasks=2, ways=3, shots=1, query=1, size=16, dtype=torch.float32)
    make, message = MALFORMED[case]
    bad = make(good)
    for call in (learner.meta_loss, learner.predict):
        with pytest.raises(MetalearnError, match=rf"^{method}: {message}") as caught:
            call(bad)
        assert "\n" not in str(caught.value)
    learner.meta_loss(good)  # the learner is unharmed


@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_what_is_not_a_task_batch_of_tensors_is_named(method):
    """A tensor of images for a TaskBatch, or a batch of arrays: one line naming what is wanted
    (an AttributeError or a torch TypeError from inside the method before)."""
    learner = embedding_learner(method)
    good = image_batch(tasks=2, ways=3, shots=1, query=1, size=16, dtype=torch.float32)
    with pytest.raises(MetalearnError, match=rf"^{method}: takes a TaskBatch .*got Tensor; for images and labels "
                                             r"of your own use learner.fit_predict"):
        learner.predict(good.query_x)
    # a batch of arrays is refused where it is built, before torch reads it (tests/test_api_misuse.py)
    with pytest.raises(MetalearnError, match=r"^TaskBatch's support_x is a numpy.ndarray; a TaskBatch holds tensors"):
        TaskBatch(good.support_x.numpy(), good.support_y, good.query_x.numpy(), good.query_y, 3)


@pytest.mark.parametrize("method", EMBEDDING_METHODS)
def test_unknown_query_labels_are_for_predictions_only(method):
    """-1 marks a query label as unknown (``learner.task_batch`` gives it): ``predict`` takes it,
    ``meta_loss``, whose loss reads the labels, refuses it in one line."""
    learner = embedding_learner(method)
    batch = image_batch(tasks=2, ways=3, shots=1, query=1, size=16, dtype=torch.float32)
    unknown = relabelled(batch, query_y=torch.full_like(batch.query_y, -1))
    torch.testing.assert_close(learner.predict(unknown), learner.predict(batch))
    with pytest.raises(MetalearnError, match=rf"^{method}: query_y has class ids \[-1\] outside 0..2, the tasks"):
        learner.meta_loss(unknown)


def test_a_network_that_does_not_take_the_images_or_embed_them_as_vectors_is_refused():
    batch = image_batch(tasks=2, ways=3, shots=1, query=1, size=16, dtype=torch.float32)
    with pytest.raises(MetalearnError, match=r"^protonet: the network cannot take these tasks' inputs, of shape "
                                             r"\(1, 16, 16\) \(Given groups=1"):
        ProtoNet(Conv4(3, None, hidden=8, pooling="max")).meta_loss(batch)  # a 3-channel network
    with pytest.raises(MetalearnError, match=r"^protonet: the embedding network's output per example has shape "
                                             r"\(1, 16, 16\); it must be one vector"):
        ProtoNet(nn.Identity()).predict(batch)
