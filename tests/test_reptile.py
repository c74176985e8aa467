"""Reptile: the update direction against hand-computed adapted weights, the vmapped inner loop
against per-task ``torch.optim`` loops, both evaluation modes against their definitions, a
learning run, and the trainer / evaluator / CLI around it.

The references here share no code with ``metalearn.algorithms.reptile`` beyond
:func:`minibatch_indices` (to know which examples each inner step saw): they train ``deepcopy``
s of the network with ``torch.optim.SGD`` / ``torch.optim.Adam`` in a Python loop over tasks.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checkpoints import interrupted_and_resumed
from metalearn.algorithms import METHODS
from metalearn.distributed import World
from metalearn.algorithms.reptile import PREDICT_ORDER_SEED, Reptile, adam_init, adam_step, minibatch_indices
from metalearn.api import evaluate_run, resolve_config, train
from metalearn.algorithms import make_method_config
from metalearn.errors import MetalearnError
from metalearn.models import MLP, Conv4
from metalearn.tasks.batch import TaskBatch
from metalearn.tasks.sinusoid import SinusoidTasks
from batches import image_batch as random_image_batch


pytestmark = pytest.mark.usefixtures("one_thread")


def image_batch(tasks=3, ways=3, shots=4, query=2, size=12, seed=0, dtype=torch.float64) -> TaskBatch:
    return random_image_batch(tasks, ways, shots, query, size, seed, dtype)


def conv_model(ways=3, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return Conv4(1, ways, hidden=8).double()


def reference_adapt(model: nn.Module, x, y, index, optimizer: str, lr: float, betas=(0.0, 0.999)) -> nn.Module:
    """A copy of ``model`` trained on one task with torch.optim, one step per row of ``index``
    (steps, batch_size) of positions in ``x``/``y``."""
    adapted = copy.deepcopy(model)
    if optimizer == "adam":
        opt = torch.optim.Adam(adapted.parameters(), lr=lr, betas=betas, eps=1e-8)
    else:
        opt = torch.optim.SGD(adapted.parameters(), lr=lr)
    for rows in index:
        prediction = adapted(x[rows])
        loss = F.cross_entropy(prediction, y[rows]) if y.dtype == torch.long else F.mse_loss(prediction, y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return adapted


def flat(params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params])


# -- the pure pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.999), (0.5, 0.9)])
def test_functional_adam_matches_torch_optim_adam(betas):
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    reference = [p.clone().requires_grad_() for p in params.values()]
    optimizer = torch.optim.Adam(reference, lr=0.01, betas=betas, eps=1e-8)
    state = adam_init(params)
    target = torch.randn(5, 4, dtype=torch.float64)
    inputs = torch.randn(5, 3, dtype=torch.float64)

    def loss_fn(w, b):
        return ((inputs @ w + b - target) ** 2).mean() + (w**4).sum()  # gradients of uneven size

    for _ in range(6):
        grads = torch.autograd.grad(loss_fn(*[p.requires_grad_() for p in params.values()]), list(params.values()))
        params, state = adam_step({k: v.detach() for k, v in params.items()}, dict(zip(params, grads)), state,
                                  lr=0.01, beta1=betas[0], beta2=betas[1])
        optimizer.zero_grad()
        loss_fn(*reference).backward()
        optimizer.step()
        for ours, theirs in zip(params.values(), reference):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-14)
    assert state[2] == 6


def test_minibatches_walk_through_fresh_permutations():
    n, batch_size, steps, tasks = 5, 3, 7, 4  # 21 draws: 4 full epochs and one started
    index = minibatch_indices(n, batch_size, steps, tasks, torch.Generator().manual_seed(0))
    assert index.shape == (tasks, steps, batch_size)
    sequence = index.reshape(tasks, -1)
    for t in range(tasks):
        for epoch in range(4):  # every run of n consecutive draws is a permutation (no replacement)
            assert sorted(sequence[t, epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert len({tuple(row.tolist()) for row in sequence}) == tasks  # each task its own order
    # a batch larger than the support set takes each example as often as the epochs allow
    big = minibatch_indices(5, 10, 2, 1, torch.Generator().manual_seed(1))
    assert torch.bincount(big.reshape(-1), minlength=5).tolist() == [4] * 5


# -- the meta-update ---------------------------------------------------------------------------


def test_update_direction_is_theta_minus_mean_adapted_weights_hand_computed():
    """Linear regression, 2 full-batch SGD steps per task, adapted weights by the formula
    grad_W = 2/n sum_i (W x_i + b - y_i) x_i, grad_b = 2/n sum_i (W x_i + b - y_i)."""
    torch.manual_seed(0)
    tasks, n, lr, steps = 3, 4, 0.1, 2
    model = nn.Linear(2, 1).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tasks, n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(tasks, n, 1, generator=g, dtype=torch.float64)
    batch = TaskBatch(x, y, x[:, :2] + 1, y[:, :2])
    config = Reptile.Config(inner_optimizer="sgd", inner_lr=lr, inner_steps=steps, inner_batch_size=n, model="mlp")
    reptile = Reptile(model, config)

    W, b = model.weight.detach().clone(), model.bias.detach().clone()
    phis_W, phis_b, query_losses = [], [], []
    for t in range(tasks):
        w_t, b_t = W.clone(), b.clone()
        for _ in range(steps):
            residual = x[t] @ w_t.T + b_t - y[t]  # (n, 1)
            w_t, b_t = w_t - lr * 2 / n * residual.T @ x[t], b_t - lr * 2 / n * residual.sum(0)
        phis_W.append(w_t)
        phis_b.append(b_t)
        query_losses.append(((batch.query_x[t] @ w_t.T + b_t - batch.query_y[t]) ** 2).mean())
    mean_W, mean_b = torch.stack(phis_W).mean(0), torch.stack(phis_b).mean(0)

    loss, metrics = reptile.meta_loss(batch)
    loss.backward()
    torch.testing.assert_close(model.weight.grad, W - mean_W, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.bias.grad, b - mean_b, rtol=1e-12, atol=1e-14)
    # the value is the mean query loss after adaptation, which is what the trainer logs
    torch.testing.assert_close(loss.detach(), torch.stack(query_losses).mean(), rtol=1e-12, atol=1e-14)
    distance = torch.cat([(W - mean_W).reshape(-1), b - mean_b]).norm()
    torch.testing.assert_close(metrics["update_norm"], distance, rtol=1e-12, atol=1e-14)

    # one SGD meta-step at learning rate epsilon: theta <- theta + epsilon (mean phi - theta)
    epsilon = 0.3
    torch.optim.SGD(model.parameters(), lr=epsilon).step()
    torch.testing.assert_close(model.weight.detach(), W + epsilon * (mean_W - W), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.bias.detach(), b + epsilon * (mean_b - b), rtol=1e-12, atol=1e-14)
    # and at epsilon = 1 the initialization becomes the mean of the adapted weights
    model.weight.data.copy_(W)
    model.bias.data.copy_(b)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    torch.testing.assert_close(model.weight.detach(), mean_W, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer, lr", [("adam", 0.01), ("sgd", 0.3)])
def test_vmapped_inner_loop_equals_per_task_torch_optim_loop(optimizer, lr):
    """Conv4 with batch norm, mini-batches of 5 from 12 support examples (batches cross epoch
    boundaries), Adam with beta1 = 0 as in the reference code, or SGD."""
    model, batch = conv_model(), image_batch(tasks=3, ways=3, shots=4)
    steps, batch_size = 4, 5
    config = Reptile.Config(inner_optimizer=optimizer, inner_lr=lr, inner_steps=steps, inner_batch_size=batch_size)
    reptile = Reptile(model, config)

    torch.manual_seed(11)
    loss, metrics = reptile.meta_loss(batch)
    loss.backward()

    torch.manual_seed(11)  # the same draw of mini-batches as meta_loss makes
    index = minibatch_indices(batch.support_x.shape[1], batch_size, steps, batch.num_tasks)
    adapted = [reference_adapt(model, batch.support_x[t], batch.support_y[t], index[t], optimizer, lr)
               for t in range(batch.num_tasks)]
    mean_phi = torch.stack([flat(m.parameters()) for m in adapted]).detach().mean(0)
    expected = flat(model.parameters()).detach() - mean_phi
    torch.testing.assert_close(flat(p.grad for p in model.parameters()), expected, rtol=1e-9, atol=1e-11)
    assert expected.abs().max() > 1e-3  # adaptation moved the weights

    with torch.no_grad():
        logits = [m(batch.query_x[t]) for t, m in enumerate(adapted)]
    query_loss = torch.stack([F.cross_entropy(z, batch.query_y[t]) for t, z in enumerate(logits)]).mean()
    correct = torch.cat([z.argmax(-1) == batch.query_y[t] for t, z in enumerate(logits)])
    torch.testing.assert_close(loss.detach(), query_loss, rtol=1e-9, atol=1e-11)
    assert float(metrics["accuracy"]) == pytest.approx(float(correct.double().mean()))


def outer_step(reptile, outer, batch, seed):
    """One meta-step as the trainer takes it: meta_loss with the global generator seeded, the
    outer optimiser's step, then end_step (where the carried Adam state advances)."""
    torch.manual_seed(seed)
    loss, _ = reptile.meta_loss(batch)
    outer.zero_grad()
    loss.backward()
    outer.step()
    reptile.end_step(World())


def test_carried_adam_state_is_one_torch_adam_running_through_the_tasks():
    """``inner_adam_state="carried"`` against the reference code's behaviour, written with one
    ``torch.optim.Adam`` that lives through meta-training: each task starts from the current
    initialization but from the optimiser's state as the last task left it, and each test task
    starts from the trained state, which it leaves unchanged. One task per meta-step, where
    the side-by-side tasks of a meta-batch are exactly the sequence."""

    model = conv_model()
    steps, batch_size, epsilon, lr = 3, 5, 0.5, 0.01
    config = Reptile.Config(inner_lr=lr, inner_steps=steps, inner_batch_size=batch_size, inner_adam_state="carried",
                            test_inner_steps=4, test_inner_batch_size=batch_size)
    reptile = Reptile(copy.deepcopy(model), config)
    outer = torch.optim.SGD(reptile.parameters(), lr=epsilon)

    runner = copy.deepcopy(model)  # the reference: theta lives in `theta`, the optimiser in `adam`
    adam = torch.optim.Adam(runner.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    theta = [p.detach().clone() for p in model.parameters()]

    def train_from_theta(task: TaskBatch, index) -> None:  # the runner adapts from theta, adam's state as it is
        with torch.no_grad():
            for p, t in zip(runner.parameters(), theta):
                p.copy_(t)
        for rows in index:
            adam.zero_grad()
            F.cross_entropy(runner(task.support_x[0][rows]), task.support_y[0][rows]).backward()
            adam.step()

    for step in range(3):
        batch = image_batch(tasks=1, seed=step)
        outer_step(reptile, outer, batch, seed=step)

        torch.manual_seed(step)
        train_from_theta(batch, minibatch_indices(batch.support_x.shape[1], batch_size, steps, 1)[0])
        theta = [t + epsilon * (p.detach() - t) for p, t in zip(runner.parameters(), theta)]

    torch.testing.assert_close(flat(reptile.model.parameters()).detach(), flat(theta), rtol=1e-9, atol=1e-11)
    first, second, taken = reptile.carried_adam.state()
    states = [adam.state[p] for p in runner.parameters()]
    assert taken == 3 * steps == int(states[0]["step"])
    torch.testing.assert_close(flat(first.values()), flat(s["exp_avg"] for s in states), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat(second.values()), flat(s["exp_avg_sq"] for s in states), rtol=1e-9, atol=1e-14)
    assert flat(second.values()).abs().max() > 0

    # at test time: the trained state, left as it was
    test = image_batch(tasks=1, seed=7)
    logits = reptile.predict(test)[0]
    assert reptile.carried_adam.state()[2] == 3 * steps
    train_from_theta(test, minibatch_indices(test.support_x.shape[1], batch_size, 4, 1,
                                             torch.Generator().manual_seed(PREDICT_ORDER_SEED))[0])
    with torch.no_grad():
        torch.testing.assert_close(logits, runner(test.query_x[0]), rtol=1e-8, atol=1e-10)


def test_carried_adam_state_advances_as_tasks_in_sequence():
    """Several tasks side by side: the state advances by the closed form of
    :class:`CarriedAdamState`, which is the sequence when every task changes the moments alike."""
    from metalearn.algorithms.reptile import CarriedAdamState

    start = ({"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}, {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}, 6)
    per_task = {"w": torch.tensor([0.5, -1.0], dtype=torch.float64)}  # each task adds this after its K steps
    tasks, k, beta1, beta2 = 3, 2, 0.5, 0.9
    state = CarriedAdamState({"w": torch.zeros(2, dtype=torch.float64)}).double()
    changes = ({"w": tasks * per_task["w"]}, {"w": tasks * per_task["w"] ** 2})
    state.advance(start, changes, tasks, k, beta1, beta2)
    first, second = start[0]["w"], start[1]["w"]
    for _ in range(tasks):  # one task after another: decay over its K steps, plus its own change
        first = beta1**k * first + per_task["w"]
        second = beta2**k * second + per_task["w"] ** 2
    new_first, new_second, taken = state.state()
    torch.testing.assert_close(new_first["w"], first)
    torch.testing.assert_close(new_second["w"], second)
    assert taken == 6 + tasks * k


def test_carried_adam_state_after_meta_steps_of_several_tasks_against_torch_adam():
    """Several tasks per meta-step, two meta-steps (the second starts from a state that is not
    zero), float64: the carried state and the weights against an independent computation. Each
    task of a meta-step runs its own ``torch.optim.Adam``, started from the carried moments and
    step count, on the mini-batches Reptile drew; the state then advances by the closed form
    :class:`CarriedAdamState` documents, ``m <- b^(KT) m + (1 - b^(KT)) / (1 - b^K) *
    mean_tasks(m_task - b^K m)`` (so the tasks' changes are averaged, not summed twice or
    left summed), with ``K T`` steps more. Only the single-process path: the torchrun test
    covers the sum over ranks."""

    tasks, steps, batch_size, lr, epsilon, betas = 3, 2, 4, 0.01, 0.5, (0.5, 0.9)
    model = conv_model()
    config = Reptile.Config(inner_lr=lr, inner_steps=steps, inner_batch_size=batch_size, inner_beta1=betas[0],
                            inner_beta2=betas[1], inner_adam_state="carried")
    reptile = Reptile(copy.deepcopy(model), config)
    outer = torch.optim.SGD(reptile.parameters(), lr=epsilon)

    theta = [p.detach().clone() for p in model.parameters()]
    first = [torch.zeros_like(t) for t in theta]
    second = [torch.zeros_like(t) for t in theta]
    taken = 0
    for meta_step in range(2):
        batch = image_batch(tasks=tasks, seed=10 + meta_step)
        outer_step(reptile, outer, batch, seed=meta_step)

        torch.manual_seed(meta_step)  # the same mini-batches: minibatch_indices from the global generator
        index = minibatch_indices(batch.support_x.shape[1], batch_size, steps, tasks)
        adapted, task_first, task_second = [], [], []
        for t in range(tasks):
            runner = copy.deepcopy(model)
            with torch.no_grad():
                for p, value in zip(runner.parameters(), theta):
                    p.copy_(value)
            adam = torch.optim.Adam(runner.parameters(), lr=lr, betas=betas, eps=1e-8)
            for p, m, v in zip(runner.parameters(), first, second):
                adam.state[p] = {"step": torch.tensor(float(taken)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
            for rows in index[t]:
                adam.zero_grad()
                F.cross_entropy(runner(batch.support_x[t][rows]), batch.support_y[t][rows]).backward()
                adam.step()
            adapted.append([p.detach().clone() for p in runner.parameters()])
            task_first.append([adam.state[p]["exp_avg"] for p in runner.parameters()])
            task_second.append([adam.state[p]["exp_avg_sq"] for p in runner.parameters()])

        def advanced(start, per_task, beta):
            decay, total = beta**steps, beta ** (steps * tasks)
            change = torch.stack([moments - decay * start for moments in per_task]).mean(0)
            return total * start + (1 - total) / (1 - decay) * change

        first = [advanced(m, [f[i] for f in task_first], betas[0]) for i, m in enumerate(first)]
        second = [advanced(v, [s[i] for s in task_second], betas[1]) for i, v in enumerate(second)]
        taken += steps * tasks
        theta = [t + epsilon * (torch.stack([a[i] for a in adapted]).mean(0) - t) for i, t in enumerate(theta)]

        ours_first, ours_second, ours_taken = reptile.carried_adam.state()
        assert ours_taken == taken
        torch.testing.assert_close(flat(ours_first.values()), flat(first), rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(flat(ours_second.values()), flat(second), rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(flat(reptile.model.parameters()).detach(), flat(theta), rtol=1e-9, atol=1e-11)
    # the tasks differ, so a sum of their changes is no mean of them: the comparison can tell
    assert not torch.allclose(flat(task_first[0]), flat(task_first[1]))
    assert flat(second).abs().max() > 0


def test_a_malformed_batch_is_refused_in_one_line():
    """Through the Python API, labels outside 0..ways-1, uint8 images and support and query
    sets of other shapes are refused in one line (the shared check of ``check_network_fits``),
    not by torch inside ``vmap``; -1 (an unknown query label) is for ``predict`` only."""
    reptile = Reptile(conv_model(), Reptile.Config(inner_steps=1, inner_batch_size=4, test_inner_steps=1,
                                                   test_inner_batch_size=4))
    batch = image_batch(tasks=2)

    def changed(**tensors) -> TaskBatch:
        return TaskBatch(*(tensors.get(name, getattr(batch, name)) for name in
                           ("support_x", "support_y", "query_x", "query_y")), batch.ways)

    support_y, query_y = batch.support_y.clone(), batch.query_y.clone()
    support_y[0, 0], query_y[1, 1] = 3, -2
    cases = {r"support_y has class ids \[3\] outside 0..2": changed(support_y=support_y),
             r"query_y has class ids \[-2\] outside 0..2": changed(query_y=query_y),
             r"the batch's support_x is torch.uint8; inputs must be floating point":
                 changed(support_x=(batch.support_x * 255).to(torch.uint8),
                         query_x=(batch.query_x * 255).to(torch.uint8)),
             r"support examples have shape \(1, 12, 12\) and query examples \(1, 8, 8\)":
                 changed(query_x=batch.query_x[..., :8, :8])}
    for message, bad in cases.items():
        for call in (reptile.meta_loss, reptile.predict, reptile.predict_per_step):
            with pytest.raises(MetalearnError, match=rf"^reptile: {message}") as caught:
                call(bad)
            assert "\n" not in str(caught.value)
    unknown = changed(query_y=torch.full_like(batch.query_y, -1))
    torch.testing.assert_close(reptile.predict(unknown), reptile.predict(batch))
    with pytest.raises(MetalearnError, match=r"^reptile: query_y has class ids \[-1\] outside 0..2, the tasks"):
        reptile.meta_loss(unknown)


def test_float16_weights_are_refused_with_the_inner_adam_and_adapt_with_sgd():
    """In float16 the inner Adam's eps (1e-8) rounds to 0: adapting then divides 0 by 0 where a
    gradient is 0, and every prediction would be NaN. meta_loss and predict refuse it in one
    line; the inner SGD adapts in float16 (finite predictions), bfloat16 adapts with Adam."""
    batch = image_batch(tasks=2, dtype=torch.float32)
    configs = dict(inner_steps=2, inner_batch_size=4, test_inner_steps=2, test_inner_batch_size=4)
    adam = Reptile(Conv4(1, 3, hidden=8).half(), Reptile.Config(inner_optimizer="adam", **configs))
    for call in (adam.meta_loss, adam.predict, adam.predict_per_step):
        with pytest.raises(MetalearnError, match=r"^reptile: the network's weights are torch.float16, in which the "
                                                 r"inner Adam's eps .* or inner_optimizer sgd$"):
            call(batch.to(torch.float16))
    sgd = Reptile(Conv4(1, 3, hidden=8).half(), Reptile.Config(inner_optimizer="sgd", inner_lr=0.1, **configs))
    assert torch.isfinite(sgd.predict(batch.to(torch.float16)).float()).all()
    adam.to(torch.bfloat16)
    assert torch.isfinite(adam.predict(batch.to(torch.bfloat16)).float()).all()


# -- evaluation --------------------------------------------------------------------------------


def test_transductive_and_non_transductive_predictions():
    model, batch = conv_model(), image_batch(tasks=2, ways=3, shots=2, query=3)
    steps, batch_size = 3, 4
    config = Reptile.Config(inner_lr=0.01, test_inner_steps=steps, test_inner_batch_size=batch_size)
    transductive = Reptile(model, config).predict(batch)
    single = Reptile(model, dataclasses.replace(config, transductive=False)).predict(batch)
    assert transductive.shape == single.shape == (2, 9, 3)

    order = minibatch_indices(batch.support_x.shape[1], batch_size, steps, 1,
                              torch.Generator().manual_seed(PREDICT_ORDER_SEED))[0]  # the same for every task
    for t in range(batch.num_tasks):
        adapted = reference_adapt(model, batch.support_x[t], batch.support_y[t], order, "adam", 0.01)
        with torch.no_grad():
            torch.testing.assert_close(transductive[t], adapted(batch.query_x[t]), rtol=1e-9, atol=1e-11)
            for j in range(batch.query_x.shape[1]):  # the support set plus this one query example
                alone = adapted(torch.cat([batch.support_x[t], batch.query_x[t, j:j + 1]]))[-1]
                torch.testing.assert_close(single[t, j], alone, rtol=1e-9, atol=1e-11)
    # batch norm makes the two modes differ; a query example's prediction then depends on the
    # other query examples only when transductive
    assert (transductive - single).abs().max() > 1e-3
    others_dimmed = torch.cat([batch.query_x[:, :1], batch.query_x[:, 1:] * 0.1], dim=1)
    changed = TaskBatch(batch.support_x, batch.support_y, others_dimmed, batch.query_y, batch.ways)
    assert not torch.allclose(Reptile(model, config).predict(changed)[:, 0], transductive[:, 0])
    single_changed = Reptile(model, dataclasses.replace(config, transductive=False)).predict(changed)
    torch.testing.assert_close(single_changed[:, 0], single[:, 0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("transductive", [True, False])
def test_a_task_scores_the_same_wherever_it_sits_in_the_batch(transductive):
    """A distributed evaluation gives each rank a slice of a chunk of episodes: a task's
    predictions must not depend on its position (they did when every position had its own
    mini-batch order)."""
    model, batch = conv_model(), image_batch(tasks=4, ways=3, shots=2, query=2)
    reptile = Reptile(model, Reptile.Config(inner_lr=0.01, test_inner_steps=3, test_inner_batch_size=4,
                                            transductive=transductive))
    whole = reptile.predict(batch)
    tail = TaskBatch(batch.support_x[2:], batch.support_y[2:], batch.query_x[2:], batch.query_y[2:], batch.ways)
    torch.testing.assert_close(reptile.predict(tail), whole[2:], rtol=1e-9, atol=1e-11)
    if transductive:
        torch.testing.assert_close(reptile.predict_per_step(tail), reptile.predict_per_step(batch)[:, 2:],
                                   rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("images, task_chunk, query_chunk", [
    (8, 1, 1),    # 8 // (6 support + 1): one task and one query example at a time
    (30, 2, 2),   # both tasks, query examples in chunks of 2, 2, 2, 2, 1
])
def test_non_transductive_predictions_in_chunks_equal_the_unsplit_ones(monkeypatch, images, task_chunk, query_chunk):
    """At the test sizes one forward pass takes everything; a small NON_TRANSDUCTIVE_IMAGES
    forces the splits of a 20-way evaluation (over tasks, over query examples, a short last
    chunk) without changing a prediction."""
    from metalearn.algorithms import reptile as reptile_module

    model, batch = conv_model(), image_batch(tasks=2, ways=3, shots=2, query=3)  # 6 support, 9 query
    config = Reptile.Config(inner_lr=0.01, test_inner_steps=3, test_inner_batch_size=4, transductive=False)
    unsplit = Reptile(model, config).predict(batch)
    chunk_sizes, vmap = [], reptile_module.vmap

    def recording_vmap(function, *args, chunk_size=None, **kwargs):
        if chunk_size is not None:  # the vmaps over tasks, then over query examples, of the classification
            chunk_sizes.append(chunk_size)
        return vmap(function, *args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(reptile_module, "vmap", recording_vmap)
    monkeypatch.setattr(reptile_module, "NON_TRANSDUCTIVE_IMAGES", images)
    split = Reptile(model, config).predict(batch)
    assert chunk_sizes[0] == task_chunk and set(chunk_sizes[1:]) == {query_chunk}
    torch.testing.assert_close(split, unsplit, rtol=1e-10, atol=1e-12)


def test_modes_agree_without_batch_norm():
    torch.manual_seed(0)
    model = MLP(1, 1).double()
    batch = SinusoidTasks(shots=5, query=7).sample(3, torch.Generator().manual_seed(0))
    batch = TaskBatch(*(t.double() for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    config = Reptile.Config(inner_optimizer="sgd", inner_lr=0.02, test_inner_steps=4, test_inner_batch_size=3,
                            model="mlp")
    a = Reptile(model, config).predict(batch)
    b = Reptile(model, dataclasses.replace(config, transductive=False)).predict(batch)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_predict_per_step():
    model, batch = conv_model(), image_batch(tasks=2, ways=3, shots=2, query=2)
    config = Reptile.Config(inner_lr=0.01, test_inner_steps=3, test_inner_batch_size=6)
    reptile = Reptile(model, config)
    per_step = reptile.predict_per_step(batch)
    assert per_step.shape == (4, 2, 6, 3) and not per_step.requires_grad
    with torch.no_grad():
        unadapted = torch.stack([model(q) for q in batch.query_x])
    torch.testing.assert_close(per_step[0], unadapted, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_step[-1], reptile.predict(batch), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(per_step[0], per_step[-1])
    assert all(p.grad is None for p in reptile.parameters())
    # the same batch gives the same predictions: the test-time mini-batch order is fixed
    torch.testing.assert_close(reptile.predict(batch), reptile.predict(batch), rtol=0, atol=0)
    # non-transductive: only the final predictions (each costs a pass per query example)
    single = Reptile(model, dataclasses.replace(config, transductive=False))
    assert single.predict_per_step(batch).shape == (1, 2, 6, 3)


def test_predict_is_the_same_under_a_float64_default_dtype():
    """The test-time mini-batch order is drawn in float32 whatever torch's default dtype (a
    float64 default draws other numbers from the same seed, so other mini-batches): a notebook
    that set float64 gets the answers of one that did not."""
    torch.manual_seed(0)
    reptile = Reptile(MLP(1, 1, hidden=(8,)), Reptile.Config(inner_lr=0.01, test_inner_steps=4,
                                                             test_inner_batch_size=3))
    batch = SinusoidTasks(10, 10).sample(2, torch.Generator().manual_seed(0))
    expected = reptile.predict(batch)
    order = minibatch_indices(10, 3, 4, 2, torch.Generator().manual_seed(0))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        answers = reptile.predict(batch)
        reordered = minibatch_indices(10, 3, 4, 2, torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(reordered, order)
    assert answers.dtype == torch.float32 and torch.equal(answers, expected)


# -- learning ----------------------------------------------------------------------------------


def test_sinusoid_meta_training_lowers_post_adaptation_error():
    torch.manual_seed(0)
    tasks = SinusoidTasks(shots=10, query=10)
    held_out = SinusoidTasks(shots=10, query=50).sample(200, torch.Generator().manual_seed(1234))
    config = Reptile.Config(inner_optimizer="sgd", inner_lr=0.02, inner_steps=5, inner_batch_size=10,
                            test_inner_steps=10, test_inner_batch_size=10, model="mlp")
    reptile = Reptile(MLP(), config)

    def held_out_mse() -> list[float]:  # query MSE after 0..10 adaptation steps
        return [float(F.mse_loss(p, held_out.query_y)) for p in reptile.predict_per_step(held_out)]

    before = held_out_mse()
    steps = 250
    optimizer = torch.optim.SGD(reptile.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = reptile.meta_loss(tasks.sample(10, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    after = held_out_mse()
    # about 3.9 -> 1.3 after ten steps, and the ten steps themselves now help (about 2.9 -> 1.3)
    assert after[-1] < 0.5 * before[-1], (before, after)
    assert after[-1] < 0.7 * after[0], (before, after)


# -- configuration, trainer, evaluator, CLI ----------------------------------------------------


def test_paper_defaults_and_registry():
    assert METHODS["reptile"] is Reptile
    omniglot = {"dataset": "omniglot", "shots": 10, "query": 1}
    five = resolve_config("reptile", task={**omniglot, "ways": 5, "test_shots": 1})
    # the defaults are the 5-way values, but for the Adam state the reference code carries over
    assert five.method_config == dataclasses.asdict(Reptile.Config(inner_adam_state="carried"))
    assert (five.train.meta_optimizer, five.train.meta_lr, five.train.lr_anneal) == ("sgd", 1.0, "linear")
    assert (five.train.meta_batch_size, five.train.steps) == (5, 100000)
    twenty = resolve_config("reptile", task={**omniglot, "ways": 20, "test_shots": 5},
                            method_config={"transductive": False})
    expected = {"inner_lr": 0.0005, "inner_steps": 10, "inner_batch_size": 20, "test_inner_steps": 50,
                "test_inner_batch_size": 10, "transductive": False, "inner_adam_state": "carried"}
    assert expected.items() <= twenty.method_config.items()
    assert twenty.train.steps == 200000 and twenty.task.for_testing().shots == 5
    sine = resolve_config("reptile", task={"dataset": "sinusoid"})
    assert sine.method_config["model"] == "mlp" and sine.train.meta_lr == 0.1
    with pytest.raises(MetalearnError, match="Reptile.Config.inner_optimizer"):
        Reptile.Config(inner_optimizer="rmsprop")
    # what --set transductive=False gives: coerced to the bool, junk refused
    assert make_method_config("reptile", {"transductive": "False"}).transductive is False
    with pytest.raises(MetalearnError, match="transductive must be bool"):
        make_method_config("reptile", {"transductive": "nope"})
    with pytest.raises(MetalearnError, match="buffers"):
        Reptile(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)))


@pytest.mark.parametrize("dataset, ways", [("omniglot", 5), ("omniglot", 20), ("mini-imagenet", 5)])
def test_inner_sgd_with_the_paper_defaults_stores_no_carried_adam_state(dataset, ways):
    """The paper's image settings carry the inner Adam state; with ``--inner-optimizer sgd``
    there is none, and the stored configuration says ``fresh``, not ``carried`` (which
    ``metalearn eval --set inner_optimizer=adam`` would then refuse, blaming a fresh state the
    configuration does not show). A carried state given together with sgd stays refused."""
    task = {"dataset": dataset, "ways": ways, "shots": 10, "query": 1, "test_shots": 1}
    assert resolve_config("reptile", task=task).method_config["inner_adam_state"] == "carried"
    sgd = resolve_config("reptile", task=task, method_config={"inner_optimizer": "sgd"})
    assert sgd.method_config["inner_optimizer"] == "sgd" and sgd.method_config["inner_adam_state"] == "fresh"
    # a configuration stored before (sgd with carried) reads the same way; and no Adam state is kept
    stored = make_method_config("reptile", {**sgd.method_config, "inner_adam_state": "carried"})
    assert stored.inner_adam_state == "fresh" and Reptile(conv_model(), stored).carried_adam is None
    with pytest.raises(MetalearnError, match="Reptile.Config.inner_adam_state applies only with "
                                             "Reptile.Config.inner_optimizer adam"):
        resolve_config("reptile", task=task, method_config={"inner_optimizer": "sgd", "inner_adam_state": "carried"})


def test_an_sgd_run_with_the_paper_defaults_evaluates(tmp_path, omniglot_data_dir):
    """An Omniglot run with ``--inner-optimizer sgd`` over the paper's (carried-Adam) settings
    trains and evaluates, also with Adam at test time from a fresh state."""
    config = resolve_config(
        "reptile",
        task={"dataset": "omniglot", "ways": 3, "shots": 3, "test_shots": 1, "query": 1},
        method_config={"inner_optimizer": "sgd", "inner_steps": 1, "inner_batch_size": 3, "test_inner_steps": 1,
                       "test_inner_batch_size": 3},
        train={"steps": 1, "meta_batch_size": 1, "val_every": 0, "eval_episodes": 2},
    )
    run_dir, _ = train(config, tmp_path / "run", data_dir=omniglot_data_dir, progress=False,
                       evaluate_after=False, announce=lambda _: None)
    saved = json.loads((run_dir / "config.json").read_text())["method_config"]
    assert (saved["inner_optimizer"], saved["inner_adam_state"]) == ("sgd", "fresh")
    assert evaluate_run(run_dir, data_dir=omniglot_data_dir, progress=False)["episodes"] == 2
    adam = evaluate_run(run_dir, data_dir=omniglot_data_dir, progress=False, overrides={"inner_optimizer": "adam"})
    assert adam["episodes"] == 2


def test_train_and_evaluate_with_and_without_transduction(tmp_path, omniglot_data_dir):
    config = resolve_config(
        "reptile",
        task={"dataset": "omniglot", "ways": 3, "shots": 3, "test_shots": 1, "query": 1},
        method_config={"inner_steps": 2, "inner_batch_size": 4, "test_inner_steps": 2,
                          "test_inner_batch_size": 3},
        train={"steps": 3, "meta_batch_size": 2, "val_every": 0, "log_every": 1, "eval_episodes": 4},
    )
    run_dir, _ = train(config, tmp_path / "run", data_dir=omniglot_data_dir, progress=False,
                       evaluate_after=False, announce=lambda _: None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all({"loss", "accuracy", "update_norm"} <= r.keys() for r in records)

    transductive = evaluate_run(run_dir, data_dir=omniglot_data_dir, progress=False)
    single = evaluate_run(run_dir, data_dir=omniglot_data_dir, progress=False, overrides={"transductive": False})
    assert transductive["episodes"] == single["episodes"] == 4
    assert len(transductive["per_step"]) == 3 and len(single["per_step"]) == 1
    final_only = evaluate_run(run_dir, data_dir=omniglot_data_dir, progress=False, per_step=False)
    assert final_only["scores"] == transductive["scores"] and final_only["per_step"] == [transductive["mean"]]
    assert (run_dir / "eval.json").is_file() and (run_dir / "eval-transductive=false.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["method_config"]["transductive"] is True


def test_a_carried_run_can_be_tested_with_fresh_adam_but_not_the_reverse(tmp_path):
    common = {"train": {"steps": 2, "meta_batch_size": 2, "val_every": 0, "eval_episodes": 4}}
    inner = {"inner_optimizer": "adam", "inner_lr": 0.01, "inner_batch_size": 4, "test_inner_steps": 3}
    runs = {}
    for state in ("carried", "fresh"):
        config = resolve_config("reptile", task={"dataset": "sinusoid", "shots": 6},
                                method_config={**inner, "inner_adam_state": state}, **common)
        runs[state], _ = train(config, tmp_path / state, progress=False, evaluate_after=False, announce=lambda _: None)
    carried = evaluate_run(runs["carried"], progress=False)
    fresh = evaluate_run(runs["carried"], progress=False, overrides={"inner_adam_state": "fresh"})
    assert carried["per_step"][0] == fresh["per_step"][0]  # the same weights before adaptation
    assert carried["per_step"][-1] != fresh["per_step"][-1]  # adapted from different Adam states
    with pytest.raises(MetalearnError, match="no carried inner Adam state"):
        evaluate_run(runs["fresh"], progress=False, overrides={"inner_adam_state": "carried"})


def test_command_line_options(capsys):
    from metalearn.cli import main

    try:
        main(["train", "reptile", "--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    for option in ("--inner-optimizer", "--inner-batch-size", "--test-inner-batch-size", "--inner-beta1",
                   "--transductive", "--no-transductive"):
        assert option in out


@pytest.mark.parametrize("inner", [{}, {"inner_optimizer": "adam", "inner_lr": 0.01, "inner_adam_state": "carried"}],
                         ids=["sgd", "carried-adam"])
def test_resume_continues_exactly(tmp_path, inner):
    """The mini-batch order comes from the generator the trainer seeds per step, plain SGD with
    the linear anneal has only the scheduler as state, and a carried inner Adam state is in the
    checkpoint: interrupted after 2 of 4 steps and resumed gives the weights (and the carried
    state) of 4 steps straight."""
    from metalearn.training import build_trainer

    config = resolve_config("reptile", task={"dataset": "sinusoid", "shots": 6},
                            method_config={"inner_batch_size": 4, "test_inner_steps": 2, **inner},
                            train={"steps": 4, "meta_batch_size": 3, "val_every": 0, "checkpoint_every": 2})
    straight = build_trainer(config, tmp_path / "a")
    straight.fit(progress=False)

    resumed = interrupted_and_resumed(lambda **resume: build_trainer(config, tmp_path / "b", **resume))
    final = resumed.learner.state_dict()
    assert final.keys() == straight.learner.state_dict().keys()
    assert any(name.startswith("carried_adam.") for name in final) == bool(inner)
    for name, value in straight.learner.state_dict().items():
        assert torch.equal(value, final[name]), name
    initial = build_trainer(config, tmp_path / "c").learner.state_dict()
    assert not torch.equal(final["model.net.0.weight"], initial["model.net.0.weight"])  # it trained


def test_the_query_defaults_to_one_image_per_class_as_the_reference_code_tests():
    """Transduction classifies a task's query images together; the reference code's protocol is
    one per class, so a run given only --shots is tested that way (a user's --query stays)."""
    from metalearn.api import resolve_config

    config = resolve_config("reptile", task={"ways": 5, "shots": 10, "test_shots": 1})
    assert (config.task.query, config.task.test_query) == (1, None)
    assert resolve_config("reptile", task={"shots": 10, "query": 5}).task.query == 5
