"""MAML's vmapped torch.func meta-gradient against an independent per-task reference.

The reference below shares no code with ``metalearn.algorithms.maml``: it applies the networks
through their own functional forwards (``F.linear`` / ``F.conv2d`` / ``F.batch_norm`` on the
model's parameter tensors), differentiates the inner loop with
``torch.autograd.grad(create_graph=True)`` and loops over tasks in Python.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms import METHODS
from metalearn.algorithms.maml import MAML, multi_step_weights
from metalearn.errors import MetalearnError
from metalearn.models import MLP, BatchStatNorm, Conv4, reference_conv4
from metalearn.tasks.batch import TaskBatch
from metalearn.tasks.sinusoid import SinusoidTasks
from batches import double, image_batch
from reference import central_difference, conv_problem, mlp_forward, ref_adapt, ref_task_loss

# -- the independent reference -----------------------------------------------------------------


def ref_meta_loss(forward, params, batch: TaskBatch, steps, lr, first_order=False, multi_step=False):
    """Mean over tasks (a Python loop) of the query loss after the last inner step, or of the
    mean of the query losses after each inner step (``multi_step``)."""
    if not callable(lr):
        lr = (lambda value: (lambda name, step: value))(lr)
    losses = []
    for t in range(batch.num_tasks):
        trajectory = ref_adapt(forward, params, batch.support_x[t], batch.support_y[t], steps, lr, first_order)
        scored = trajectory[1:] if multi_step else trajectory[-1:]
        query = [ref_task_loss(forward(p, batch.query_x[t]), batch.query_y[t]) for p in scored]
        losses.append(torch.stack(query).mean())
    return torch.stack(losses).mean()


# -- problems --------------------------------------------------------------------------------


def sinusoid_problem(tasks=4, hidden=(40, 40), seed=0):
    torch.manual_seed(seed)
    model = MLP(1, 1, hidden).double()
    batch = double(SinusoidTasks(shots=5, query=10).sample(tasks, torch.Generator().manual_seed(seed)))
    return model, batch, mlp_forward


PROBLEMS = {
    "sinusoid-mlp": (sinusoid_problem, 0.01),
    "conv4": (conv_problem, 0.4),
}


def maml_grads(maml: MAML, batch: TaskBatch):
    loss, _ = maml.meta_loss(batch)
    return loss, torch.autograd.grad(loss, list(maml.model.parameters()))


def ref_grads(model: nn.Module, forward, batch, steps, lr, first_order=False, multi_step=False):
    params = dict(model.named_parameters())
    loss = ref_meta_loss(forward, params, batch, steps, lr, first_order, multi_step)
    return loss, torch.autograd.grad(loss, list(params.values()))


def assert_grads_close(actual, expected, rtol=1e-6, atol=1e-9):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def relative_difference(a, b) -> float:
    a = torch.cat([t.flatten() for t in a])
    b = torch.cat([t.flatten() for t in b])
    return float((a - b).norm() / b.norm())


# -- tests -----------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("problem", PROBLEMS)
def test_reference_forward_matches_model(problem):
    """Guards the reference itself: its functional forward is the model's forward."""
    make, _ = PROBLEMS[problem]
    model, batch, forward = make()
    x = batch.query_x[0]
    torch.testing.assert_close(forward(dict(model.named_parameters()), x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_second_order_meta_gradient_matches_reference(problem, steps):
    make, lr = PROBLEMS[problem]
    model, batch, forward = make()
    maml = MAML(model, MAML.Config(inner_lr=lr, inner_steps=steps))
    loss, grads = maml_grads(maml, batch)
    ref_loss, expected = ref_grads(model, forward, batch, steps, lr)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads, expected)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_first_order_meta_gradient_matches_reference_and_differs_from_second_order(problem, steps):
    make, lr = PROBLEMS[problem]
    model, batch, forward = make()
    first = MAML(model, MAML.Config(inner_lr=lr, inner_steps=steps, first_order=True))
    loss, grads = maml_grads(first, batch)
    ref_loss, expected = ref_grads(model, forward, batch, steps, lr, first_order=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads, expected)

    _, second = ref_grads(model, forward, batch, steps, lr, first_order=False)
    assert relative_difference(grads, second) > 1e-3


@pytest.mark.parametrize("problem", PROBLEMS)
def test_derivative_order_annealing_is_first_order_then_second_order(problem):
    """MAML++'s derivative-order annealing: the meta-gradient of steps 0..N-1 equals the
    first-order reference's, from step N on the second-order reference's (float64)."""
    make, lr = PROBLEMS[problem]
    model, batch, forward = make()
    maml = MAML(model, MAML.Config(inner_lr=lr, inner_steps=2, first_order_steps=3))
    _, first = ref_grads(model, forward, batch, 2, lr, first_order=True)
    _, second = ref_grads(model, forward, batch, 2, lr, first_order=False)
    for step, expected in ((0, first), (2, first), (3, second), (50, second)):
        maml.start_step(step)
        assert maml.first_order_now() == (step < 3)
        assert_grads_close(maml_grads(maml, batch)[1], expected)
    with pytest.raises(MetalearnError, match="MAML.Config.first_order_steps switches from first to second order"):
        MAML.Config(first_order=True, first_order_steps=5)
    with pytest.raises(MetalearnError, match="MAML.Config.first_order_steps must be >= 0"):
        MAML.Config(first_order_steps=-1)


@pytest.mark.parametrize("first_order", [False, True])
def test_accuracy_metric_is_the_fraction_of_right_query_predictions(first_order):
    """Query images: the support images with a little noise, so that adaptation helps (25 of 36
    right after two steps, 9 before, 9 by the lowest logit)."""
    model, images, forward = conv_problem(tasks=4, shots=3)
    noise = 0.1 * torch.rand(images.support_x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batch = TaskBatch(images.support_x, images.support_y, (images.support_x + noise).clamp(0, 1), images.support_y,
                      images.ways)
    steps, lr = 2, 0.4
    loss, metrics = MAML(model, MAML.Config(inner_lr=lr, inner_steps=steps, first_order=first_order)).meta_loss(batch)
    params = dict(model.named_parameters())
    right, unadapted = 0, 0
    for t in range(batch.num_tasks):
        trajectory = ref_adapt(forward, params, batch.support_x[t], batch.support_y[t], steps,
                               lambda name, step: lr, first_order=True)
        right += int((forward(trajectory[-1], batch.query_x[t]).argmax(-1) == batch.query_y[t]).sum())
        unadapted += int((forward(params, batch.query_x[t]).argmax(-1) == batch.query_y[t]).sum())
    total = batch.query_y.numel()  # 4 tasks x 9 queries
    assert float(metrics["accuracy"]) == pytest.approx(right / total, abs=1e-6)
    assert right != unadapted and 0 < right < total  # the adapted predictions are scored, and not trivially
    torch.testing.assert_close(metrics["loss"], loss.detach())

    model, sinusoid, _ = sinusoid_problem(tasks=2)
    assert "accuracy" not in MAML(model, MAML.Config(inner_lr=0.01)).meta_loss(sinusoid)[1]


def test_meta_gradient_matches_central_finite_differences():
    torch.manual_seed(1)
    model = MLP(1, 1, hidden=(3,)).double()
    batch = double(SinusoidTasks(shots=5, query=10).sample(2, torch.Generator().manual_seed(1)))
    maml = MAML(model, MAML.Config(inner_lr=0.05, inner_steps=2))
    _, grads = maml_grads(maml, batch)

    checked = 0
    for param, grad in zip(model.parameters(), grads):
        for i in range(param.numel()):
            numeric = central_difference(lambda: maml.meta_loss(batch)[0], param, i)
            assert grad.view(-1)[i].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8), (param.shape, i)
            checked += abs(numeric) > 1e-3
    assert checked >= 5  # most entries carry a real gradient, not a trivially matched zero


def test_conv4_meta_gradient_matches_central_finite_differences():
    """Ground truth for the batch-norm network, independent of both implementations (this is
    what caught torch's wrong second derivative of native batch norm under vmap)."""
    model, batch, forward = conv_problem(tasks=2)
    maml = MAML(model, MAML.Config(inner_lr=0.4, inner_steps=1))
    _, grads = maml_grads(maml, batch)
    named = dict(zip([n for n, _ in model.named_parameters()], grads))

    for name, param in model.named_parameters():
        if not (name.startswith("features.0.") or name.startswith("head.")):
            continue
        for i in range(2):
            numeric = central_difference(lambda: maml.meta_loss(batch)[0], param, i)
            assert named[name].view(-1)[i].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8), (name, i)
    # conv layers feeding a batch norm carry no (redundant) bias
    assert not any(name.startswith("features.") and name.endswith("0.bias") for name in named)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_learned_inner_lr_gradient_matches_reference(problem, first_order):
    make, lr = PROBLEMS[problem]
    model, batch, forward = make()
    steps = 2
    maml = MAML(model, MAML.Config(inner_lr=lr, inner_steps=steps, test_inner_steps=steps,
                                   learn_inner_lr=True, first_order=first_order)).double()
    names = [name for name, _ in model.named_parameters()]
    assert len(maml.inner_lrs) == len(names)
    with torch.no_grad():  # distinct step sizes per tensor and step, so a mix-up shows
        for lrs in maml.inner_lrs.values():
            lrs.mul_(torch.empty_like(lrs).uniform_(0.5, 1.5))
    lr_tensors = [maml.inner_lrs[name.replace(".", "__")] for name in names]

    loss, _ = maml.meta_loss(batch)
    grads = torch.autograd.grad(loss, list(model.parameters()) + lr_tensors)

    table = dict(zip(names, lr_tensors))
    ref_loss = ref_meta_loss(forward, dict(model.named_parameters()), batch, steps,
                             lambda name, step: table[name][step], first_order=first_order)
    expected = torch.autograd.grad(ref_loss, list(model.parameters()) + lr_tensors)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads, expected)
    assert all(g.abs().sum() > 0 for g in grads[len(names):])  # every step size gets a gradient


@pytest.mark.parametrize("problem", PROBLEMS)
def test_learned_inner_lr_beyond_the_training_steps_reuses_the_last_step_size(problem):
    """MAML++'s LSLR learns one step size per tensor and per training step; test-time steps
    beyond ``inner_steps`` take the last learned one: step s uses table[name][min(s, steps - 1)]."""
    make, lr = PROBLEMS[problem]
    model, batch, forward = make()
    steps, test_steps = 2, 4
    maml = MAML(model, MAML.Config(inner_lr=lr, inner_steps=steps, test_inner_steps=test_steps,
                                   learn_inner_lr=True)).double()
    names = [name for name, _ in model.named_parameters()]
    with torch.no_grad():  # distinct values per tensor and step: the first step's, the last's, any mix-up shows
        for i, name in enumerate(names):
            maml.inner_lrs[name.replace(".", "__")].copy_(
                lr * torch.tensor([1.0 - 0.03 * i, 0.5 + 0.04 * i], dtype=torch.float64))
    table = {name: maml.inner_lrs[name.replace(".", "__")].detach() for name in names}
    with torch.no_grad():
        per_step = maml.predict_per_step(batch)
    assert per_step.shape[0] == test_steps + 1

    params = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
    for t in range(batch.num_tasks):
        trajectory = ref_adapt(forward, params, batch.support_x[t], batch.support_y[t], test_steps,
                               lambda name, step: table[name][min(step, steps - 1)], first_order=True)
        for s in range(test_steps + 1):
            expected = forward(trajectory[s], batch.query_x[t]).detach()
            torch.testing.assert_close(per_step[s, t], expected, rtol=1e-8, atol=1e-10)
    # a wrong rule (the first step size again after the trained steps) would predict otherwise
    t = 0
    wrong = ref_adapt(forward, params, batch.support_x[t], batch.support_y[t], test_steps,
                      lambda name, step: table[name][step if step < steps else 0], first_order=True)
    assert not torch.allclose(per_step[-1, t], forward(wrong[-1], batch.query_x[t]).detach(), rtol=1e-6, atol=1e-9)


def reference_step_losses(model, forward, batch, steps, lr) -> torch.Tensor:
    """(tasks, steps): each task's query loss after each inner step, by the reference loop."""
    params = dict(model.named_parameters())
    per_step = torch.zeros(batch.num_tasks, steps, dtype=torch.float64)
    for t in range(batch.num_tasks):
        trajectory = ref_adapt(forward, params, batch.support_x[t], batch.support_y[t], steps,
                               lambda name, step: lr, first_order=False)
        for s in range(steps):
            per_step[t, s] = ref_task_loss(forward(trajectory[s + 1], batch.query_x[t]), batch.query_y[t])
    return per_step


@pytest.mark.parametrize("problem", PROBLEMS)
def test_multi_step_loss_is_mean_of_query_losses_after_each_step(problem):
    make, lr = PROBLEMS[problem]
    model, batch, forward = make()
    steps = 3
    maml = MAML(model, MAML.Config(inner_lr=lr, inner_steps=steps, multi_step_loss=True))
    loss, grads = maml_grads(maml, batch)

    # spelled out: per task, the query loss after each of the 3 steps, then the mean of all
    per_step = reference_step_losses(model, forward, batch, steps, lr)
    torch.testing.assert_close(loss, per_step.mean(), rtol=1e-10, atol=1e-12)

    _, expected = ref_grads(model, forward, batch, steps, lr, multi_step=True)
    assert_grads_close(grads, expected)
    last_only = MAML(model, MAML.Config(inner_lr=lr, inner_steps=steps)).meta_loss(batch)[0]
    assert not torch.allclose(loss, last_only)


def test_multi_step_weights_follow_the_maml_plus_plus_schedule():
    """MAML++'s code: earlier weights 1/N - progress/N, clamped at 0.03/N; the last takes the
    rest; from the end of the anneal on, the last step's loss alone."""
    torch.testing.assert_close(multi_step_weights(5, 0.0), torch.full((5,), 0.2, dtype=torch.float64))
    # halfway: earlier steps at 0.2 * (1 - 0.5) = 0.1, the last takes the rest
    torch.testing.assert_close(multi_step_weights(5, 0.5),
                               torch.tensor([0.1] * 4 + [0.6], dtype=torch.float64))
    # at 98% of the anneal the floor 0.03 / 5 = 0.006 holds (0.2 * 0.02 = 0.004 would be below it)
    torch.testing.assert_close(multi_step_weights(5, 0.98),
                               torch.tensor([0.006] * 4 + [0.976], dtype=torch.float64))
    torch.testing.assert_close(multi_step_weights(5, 1.0),
                               torch.tensor([0.0] * 4 + [1.0], dtype=torch.float64))
    torch.testing.assert_close(multi_step_weights(5, 3.0),
                               torch.tensor([0.0] * 4 + [1.0], dtype=torch.float64))
    torch.testing.assert_close(multi_step_weights(1, 0.7), torch.ones(1, dtype=torch.float64))


def test_annealed_multi_step_loss_weights_the_step_losses_by_training_progress():
    make, lr = PROBLEMS["sinusoid-mlp"]
    model, batch, forward = make()
    steps = 3
    maml = MAML(model, MAML.Config(inner_lr=lr, inner_steps=steps, multi_step_loss=True,
                                   multi_step_anneal_steps=100))
    per_step = reference_step_losses(model, forward, batch, steps, lr).mean(0)
    for training_step, progress in ((0, 0.0), (25, 0.25), (100, 1.0), (400, 1.0)):
        maml.start_step(training_step)
        loss, _ = maml.meta_loss(batch)
        expected = (multi_step_weights(steps, progress) * per_step).sum()
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(MetalearnError, match="MAML.Config.multi_step_anneal_steps anneals the multi-step loss: it needs MAML.Config.multi_step_loss"):
        MAML.Config(multi_step_anneal_steps=10)


@pytest.mark.parametrize("problem", PROBLEMS)
def test_predict_per_step(problem):
    make, lr = PROBLEMS[problem]
    model, batch, forward = make()
    steps = 3
    maml = MAML(model, MAML.Config(inner_lr=lr, inner_steps=1, test_inner_steps=steps))
    with torch.no_grad():
        per_step = maml.predict_per_step(batch)
        predictions = maml.predict(batch)
    out = batch.ways if batch.is_classification else batch.query_y.shape[-1]
    assert per_step.shape == (steps + 1, batch.num_tasks, batch.query_x.shape[1], out)
    assert not per_step.requires_grad
    assert all(p.grad is None for p in maml.parameters())
    torch.testing.assert_close(predictions, per_step[-1])

    params = dict(model.named_parameters())
    for t in range(batch.num_tasks):
        torch.testing.assert_close(per_step[0, t], model(batch.query_x[t]).detach(), rtol=1e-10, atol=1e-12)
        trajectory = ref_adapt(forward, params, batch.support_x[t], batch.support_y[t], steps,
                               lambda name, step: lr, first_order=True)
        for s in range(steps + 1):
            expected = forward(trajectory[s], batch.query_x[t]).detach()
            torch.testing.assert_close(per_step[s, t], expected, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(per_step[0], per_step[-1])  # adaptation changed the predictions


def test_sinusoid_meta_training_lowers_post_adaptation_error():
    torch.manual_seed(0)
    tasks = SinusoidTasks(shots=5, query=10)
    held_out = tasks.sample(100, torch.Generator().manual_seed(1234))
    maml = MAML(MLP(), MAML.Config(inner_lr=0.01, inner_steps=1, test_inner_steps=3))

    def held_out_mse() -> list[float]:  # query MSE after 0..3 adaptation steps
        with torch.no_grad():
            return [float(F.mse_loss(p, held_out.query_y)) for p in maml.predict_per_step(held_out)]

    before = held_out_mse()
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        loss, _ = maml.meta_loss(tasks.sample(25, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_mse()
    # about 3.6 -> 1.7 after three steps; adaptation itself now helps a lot (unadapted about 2.8)
    assert after[-1] < 0.6 * before[-1], (before, after)
    assert after[-1] < 0.8 * after[0], (before, after)


def test_paper_defaults_are_finn_et_al_2017():
    """Section 5.1 (regression) and 5.2 (Omniglot) of the MAML paper; Adam's meta step size
    beta = 0.001 as in its code. Sine-or-line (not in the paper) tests with the one trained step."""
    from metalearn.api import resolve_config

    expected = {  # task: (model, alpha, inner steps, test steps, meta-batch, meta-steps)
        ("sinusoid", 0): ("mlp", 0.01, 1, 10, 25, 70000),
        ("sine-or-line", 0): ("mlp", 0.01, 1, 1, 25, 70000),
        ("omniglot", 5): ("conv4", 0.4, 1, 3, 32, 60000),
        ("omniglot", 20): ("conv4", 0.1, 5, 5, 16, 60000),
    }
    for (dataset, ways), (model, alpha, steps, test_steps, meta_batch, meta_steps) in expected.items():
        task = {"dataset": dataset, **({"ways": ways, "shots": 1} if ways else {})}
        config = resolve_config("maml", task=task)
        method = config.method_config
        assert (method["model"], method["inner_lr"], method["inner_steps"], method["test_inner_steps"]) == \
            (model, alpha, steps, test_steps), (dataset, ways)
        assert (config.train.meta_batch_size, config.train.steps) == (meta_batch, meta_steps), (dataset, ways)
        assert config.train.meta_lr == 1e-3 and not method["first_order"] and not method["learn_inner_lr"]
        if not ways:
            assert config.task.shots == 5 == config.task.query  # K = 5 (the paper also reports 10 and 20)


def test_model_with_running_stat_buffers_is_refused():
    model = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(MetalearnError, match="buffers"):
        MAML(model, MAML.Config(inner_lr=0.01, model="mlp"))
    # native batch norm without running statistics: its second derivative under vmap is wrong in
    # torch, so second-order MAML refuses it, first-order accepts it, BatchStatNorm is accepted
    native = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 1))
    with pytest.raises(MetalearnError, match="BatchStatNorm"):
        MAML(native)
    MAML(native, MAML.Config(first_order=True))
    MAML(nn.Sequential(nn.Linear(1, 8), BatchStatNorm(8), nn.ReLU(), nn.Linear(8, 1)))


def test_a_model_shared_with_protonet_stays_right_for_second_order_maml():
    """ProtoNets run the model with the native batch norm (first derivatives only) inside a
    scoped block; the module itself is untouched, so second-order MAML on the same module
    gets the meta-gradient of a copy that ProtoNets never saw."""
    from metalearn.algorithms.protonet import ProtoNet

    torch.manual_seed(0)
    shared = Conv4(1, 3, hidden=4, pooling="max").double()
    untouched = copy.deepcopy(shared)
    batch = image_batch(tasks=2, ways=3, shots=1, query=2, size=16)
    ProtoNet(shared).meta_loss(batch)[0].backward()
    shared.zero_grad()
    grads = []
    for model in (shared, untouched):
        loss, _ = MAML(model, MAML.Config(inner_lr=0.3, inner_steps=2)).meta_loss(batch)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batch_stat_norm_equals_native_batch_norm():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    ours, native = BatchStatNorm(4).double(), nn.BatchNorm2d(4, track_running_stats=False).double()
    with torch.no_grad():
        for layer in (ours, native):
            layer.weight.copy_(torch.linspace(0.5, 2, 4))
            layer.bias.copy_(torch.linspace(-1, 1, 4))
    torch.testing.assert_close(ours(x), native(x), rtol=1e-12, atol=1e-12)
    x1 = torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x1), nn.functional.batch_norm(x1, None, None, ours.weight, ours.bias, True),
                               rtol=1e-12, atol=1e-12)


def test_batch_stat_norm_without_gradients_uses_the_same_statistics():
    layer = BatchStatNorm(4).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2, 4))
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        fast = torch.vmap(layer)(torch.stack([x, 2 * x]))
    torch.testing.assert_close(fast[0], layer(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], layer(2 * x), rtol=1e-12, atol=1e-12)


def test_first_order_batch_norm_gives_the_same_values_and_gradients(monkeypatch):
    """The native kernel used inside ``first_order_batch_norm()`` (by ProtoNets, Matching
    Networks and Reptile) computes the same function and first derivatives as the
    twice-differentiable form."""
    from metalearn.models import norm

    native_calls = []
    native = F.batch_norm
    monkeypatch.setattr(norm.F, "batch_norm", lambda *a, **k: native_calls.append(1) or native(*a, **k))
    torch.manual_seed(0)
    twice = Conv4(1, None, hidden=6, pooling="max").double()

    class Once(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            with norm.first_order_batch_norm():
                return self.net(x)

    once = Once(copy.deepcopy(twice))
    x = torch.rand(7, 1, 16, 16, dtype=torch.float64)
    outputs = [twice(x)]
    assert not native_calls  # recording gradients outside the block: the twice-differentiable form
    outputs.append(once(x))
    assert len(native_calls) == 4  # one per Conv4 block
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(out.square().sum(), list(net.parameters()))
             for out, net in zip(outputs, (twice, once))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # and under vmap with torch.func.grad, as Reptile's inner loop uses it (first derivatives only)
    tasks = torch.rand(3, 5, 1, 16, 16, dtype=torch.float64)

    def inner_gradients(net):
        params = dict(net.named_parameters())
        loss = lambda p, x: torch.func.functional_call(net, p, (x,)).square().sum()
        return torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, tasks)

    for a, b in zip(inner_gradients(once).values(), inner_gradients(twice).values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# by hand: which kernel a method may use follows from its mathematics (how often it differentiates)
@pytest.mark.parametrize("method", ["protonet", "matchingnet", "reptile", "maml"])
def test_only_the_methods_that_differentiate_once_use_the_native_kernel(monkeypatch, method):
    """ProtoNets, Matching Networks and Reptile train with the faster native batch norm;
    second-order MAML never does under vmap (its second derivative there would be wrong). (Its
    task-batched path, outside vmap, does: test_the_task_batched_path_equals_vmap_and_the_reference.)"""
    from metalearn.algorithms import METHODS
    from metalearn.models import norm

    native_calls = []
    native = F.batch_norm

    def counting(*args, **kwargs):
        if torch.is_grad_enabled():  # what a meta-gradient flows through (not e.g. a shape check)
            native_calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(norm.F, "batch_norm", counting)
    torch.manual_seed(0)
    ways = 3
    model = Conv4(1, ways if method in ("reptile", "maml") else None, hidden=4, pooling="max").double()
    options = {"inner_steps": 1, "inner_batch_size": 2, "test_inner_steps": 1} if method == "reptile" else {}
    if method == "maml":
        model.can_forward_tasks = lambda: False  # the vmap path
    learner = METHODS[method](model, METHODS[method].Config(**options))
    learner.meta_loss(image_batch(tasks=2, ways=ways, shots=2, query=2, size=16))[0].backward()
    assert bool(native_calls) == (method != "maml")


def test_a_network_that_does_not_fit_the_tasks_is_a_clear_error():
    """Conv4 defaults to 5 outputs; on 3-way tasks cross-entropy would fail deep in torch (or,
    with more outputs than classes, predictions could name classes the task lacks); an MLP with
    two outputs on one-dimensional targets would broadcast silently in the squared error."""
    batch = image_batch(tasks=2, ways=3, dtype=torch.float32)
    for outputs in (2, 5):
        maml = MAML(Conv4(1, outputs), MAML.Config(inner_lr=0.1))
        with pytest.raises(MetalearnError, match=rf"outputs of shape \({outputs},\) .* the tasks are 3-way"):
            maml.meta_loss(batch)
        with pytest.raises(MetalearnError, match="one output per class"):
            maml.predict(batch)
    with pytest.raises(MetalearnError, match=r"cannot take these tasks' inputs, of shape \(1, 16, 16\)"):
        MAML(Conv4(3, 3), MAML.Config(inner_lr=0.1)).meta_loss(batch)  # Conv4(3): three input channels
    MAML(Conv4(1, 3), MAML.Config(inner_lr=0.1)).meta_loss(batch)  # the right network passes
    unlabelled = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y)  # ways left at 0
    with pytest.raises(MetalearnError, match="has class labels but ways=0"):
        MAML(Conv4(1, 3), MAML.Config(inner_lr=0.1)).meta_loss(unlabelled)

    sinusoid = SinusoidTasks(shots=5, query=5).sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(MetalearnError, match=r"regression targets have shape \(1,\)"):
        MAML(MLP(1, 2), MAML.Config(inner_lr=0.01)).meta_loss(sinusoid)
    MAML(MLP(1, 1), MAML.Config(inner_lr=0.01)).meta_loss(sinusoid)


def test_frozen_parameters_stay_fixed_in_the_inner_loop():
    """A parameter with requires_grad=False is neither meta-learned nor adapted (as in
    learn2learn, where the inner loop skips it by default)."""
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4)
    model.features[0][0].weight.requires_grad_(False)
    maml = MAML(model, MAML.Config(inner_lr=0.5, inner_steps=2))
    batch = image_batch(tasks=2, ways=3, dtype=torch.float32)
    params = {name: p.detach() for name, p in model.named_parameters()}
    adapted = maml.adapt(params, batch.support_x[0], batch.support_y[0], steps=2)[-1]
    assert torch.equal(adapted["features.0.0.weight"], params["features.0.0.weight"])
    assert not torch.equal(adapted["features.1.0.weight"], params["features.1.0.weight"])


def test_the_meta_gradient_with_a_frozen_parameter_equals_a_loop_that_holds_it_constant():
    model, batch, forward = conv_problem()
    frozen = "features.1.0.weight"
    model.get_parameter(frozen).requires_grad_(False)
    constant = model.get_parameter(frozen).detach()
    maml = MAML(model, MAML.Config(inner_lr=0.4, inner_steps=2))
    loss, _ = maml.meta_loss(batch)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    actual = torch.autograd.grad(loss, list(trainable.values()))
    # the reference adapts only the trainable tensors; the frozen one is part of the function
    ref_loss = ref_meta_loss(lambda p, x: forward({**p, frozen: constant}, x), trainable, batch, 2, 0.4)
    expected = torch.autograd.grad(ref_loss, list(trainable.values()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_grads_close(actual, expected)


# by hand: the methods that vmap an inner loop over tasks, on a regression network
@pytest.mark.parametrize("method", ["maml", "platipus", "reptile"])
def test_a_model_with_dropout_trains_and_is_deterministic_in_eval_mode(method):
    """vmap over tasks runs with randomness="different" in training (each task draws its own
    dropout mask; the default mode would refuse any random operation)."""
    from metalearn.algorithms import METHODS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Dropout(0.5), nn.Linear(40, 1))
    options = {"inner_lr": 0.01} if method != "reptile" else {"inner_steps": 2, "inner_batch_size": 5}
    learner = METHODS[method](model, METHODS[method].Config(**options))
    batch = SinusoidTasks(shots=5, query=5).sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.manual_seed(2)
    assert learner.meta_loss(batch)[0] != loss  # dropout is active: other masks, another loss
    # the same seed gives the same masks on the first call (which also checks that the network
    # fits the tasks) as on later ones: a resumed run's first step equals the uninterrupted run's
    torch.manual_seed(1)
    assert learner.meta_loss(batch)[0] == loss
    # predictions in training mode draw masks too (test-time vmaps allow random operations)
    with torch.no_grad():
        predicted = learner.predict(batch)
        assert torch.isfinite(predicted).all() and learner.predict_per_step(batch).shape[0] >= 2
    if method != "platipus":  # PLATIPUS samples models at test time: not deterministic by design
        learner.eval()  # no dropout at test time
        assert torch.equal(learner.predict(batch), learner.predict(batch))


def test_a_constant_buffer_is_fine():
    """Only running statistics are refused: a buffer the forward pass only reads is a constant."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = MLP(1, 1)
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return self.body(x * self.scale)

    torch.manual_seed(0)
    scaled = Scaled()
    maml = MAML(scaled, MAML.Config(inner_lr=0.01))
    batch = SinusoidTasks(shots=5, query=5).sample(3, torch.Generator().manual_seed(0))
    loss, _ = maml.meta_loss(batch)
    # the same body on inputs scaled by hand: the buffer is used, as a constant
    doubled = TaskBatch(2 * batch.support_x, batch.support_y, 2 * batch.query_x, batch.query_y)
    torch.testing.assert_close(loss, MAML(scaled.body, MAML.Config(inner_lr=0.01)).meta_loss(doubled)[0])


# -- the reference code's network and inner loop ------------------------------------------


def reference_network_forward(params, x):
    """The MAML reference network by hand: batch norm with offsets only, epsilon 1e-3."""
    for block in range(4):
        x = F.conv2d(x, params[f"features.{block}.0.weight"], stride=2, padding=1)
        x = F.batch_norm(x, None, None, None, params[f"features.{block}.1.bias"], training=True, eps=1e-3)
        x = F.relu(x)
    return F.linear(x.mean(dim=(-2, -1)), params["head.weight"], params["head.bias"])


def test_reference_conv4_is_built_and_initialised_as_the_authors_code():
    torch.manual_seed(0)
    model = reference_conv4(1, 20)
    names = {name for name, _ in model.named_parameters()}
    assert {f"features.{b}.1.bias" for b in range(4)} <= names
    assert not any(name.endswith(".1.weight") for name in names)  # no batch-norm scale
    assert all(block[1].eps == 1e-3 for block in model.features)
    head = model.head.weight.detach()
    assert 0.9 < float(head.std()) < 1.1 and abs(float(head.mean())) < 0.1  # N(0, 1), 1280 draws
    assert torch.equal(model.head.bias, torch.zeros(20))
    for block in model.features:
        conv = block[0].weight.detach()
        fan_in, fan_out = conv.shape[1] * 9, conv.shape[0] * 9
        bound = (6 / (fan_in + fan_out)) ** 0.5  # Xavier (Glorot) uniform
        assert float(conv.abs().max()) <= bound and float(conv.abs().max()) > 0.9 * bound
    x = torch.randn(6, 1, 28, 28)
    params = dict(model.named_parameters())
    torch.testing.assert_close(model(x), reference_network_forward(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first_order", [False, True])
def test_the_meta_gradient_without_adapting_the_norm_equals_a_loop_that_holds_it(first_order):
    """--no-adapt-norm: the batch-norm offsets are meta-learned (they get a meta-gradient) but
    every task's inner steps leave them as they are, as in the reference code."""
    torch.manual_seed(0)
    model = reference_conv4(1, 3, hidden=8).double()
    batch = image_batch(3, 3, 2, 2, 12, 0)
    maml = MAML(model, MAML.Config(inner_lr=0.4, inner_steps=2, adapt_norm=False, first_order=first_order))
    loss, grads = maml_grads(maml, batch)
    params = dict(model.named_parameters())
    norm = {name: p for name, p in params.items() if name.endswith(".1.bias")}
    adapted = {name: p for name, p in params.items() if name not in norm}
    assert len(norm) == 4
    ref_loss = ref_meta_loss(lambda p, x: reference_network_forward({**p, **norm}, x), adapted, batch, 2,
                             0.4, first_order)
    expected = torch.autograd.grad(ref_loss, list(params.values()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads, expected)
    assert all(g.abs().sum() > 0 for name, g in zip(params, grads) if name in norm)
    # the inner loop moves every other tensor and none of the offsets
    plain = {name: p.detach() for name, p in params.items()}
    after = maml.adapt(plain, batch.support_x[0], batch.support_y[0], steps=2)[-1]
    assert all(torch.equal(after[name], plain[name]) == (name in norm) for name in plain)


def test_learned_step_sizes_without_adapting_the_norm_cover_only_the_adapted_tensors():
    model = reference_conv4(1, 3, hidden=4)
    maml = MAML(model, MAML.Config(learn_inner_lr=True, adapt_norm=False))
    assert len(maml.inner_lrs) == len(list(model.parameters())) - 4
    loss, _ = maml.meta_loss(image_batch(tasks=2, ways=3, dtype=torch.float32))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in maml.inner_lrs.values())


def test_the_reference_network_takes_small_images_as_conv4_does():
    from metalearn.models import build_model

    for name in ("conv4", "conv4-reference"):  # stride-2 convolutions, no 16x16 minimum of the max-pool network
        assert build_model(name, (1, 12, 12), 5)(torch.rand(4, 1, 12, 12)).shape == (4, 5)


def test_no_adapt_norm_on_a_network_without_normalisation_is_refused():
    with pytest.raises(MetalearnError, match="has none"):
        MAML(MLP(1, 1), MAML.Config(inner_lr=0.01, adapt_norm=False))


def test_a_float64_model_trains_on_a_converted_classification_batch_and_refuses_a_float32_one():
    torch.manual_seed(0)
    float32 = image_batch(2, 3, 1, 1, 12, seed=1, dtype=torch.float32)
    maml = MAML(Conv4(1, 3, hidden=8).double(), MAML.Config(inner_lr=0.4, inner_steps=1, test_inner_steps=1, learn_inner_lr=True))
    # the learned step sizes take the network's type from the start (not float32 until .double())
    assert {p.dtype for p in maml.parameters()} == {torch.float64}
    with pytest.raises(MetalearnError, match=r"maml: the batch's inputs are torch.float32 and the network's weights "
                                             r"torch.float64; convert the batch \(batch.to\(torch.float64\)"):
        maml.meta_loss(float32)
    loss, metrics = maml.meta_loss(float32.to(torch.float64))
    # cross-entropy of the class ids (one query per class: a squared error would broadcast too)
    logits = maml.predict(float32.to(torch.float64))
    expected = F.cross_entropy(logits.flatten(0, 1), float32.query_y.flatten())
    assert loss.dtype == torch.float64 and "accuracy" in metrics
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-9)


def test_a_float64_learner_is_advised_the_dtype_of_its_source_and_trains_from_a_float64_one(tmp_path):
    """The Trainer and evaluate cannot convert a batch: where the source has a dtype (SinusoidTasks,
    SineOrLineTasks, EpisodeSampler) the refusal names it with the source's class; a source of
    one's own without one, and a batch given directly, keep the advice to convert the batch. The
    advice taken, a float64 MAML trains through the Trainer and is scored by evaluate."""
    from metalearn import EpisodeSampler, Trainer, evaluate, resolve_config
    from metalearn.data.splits import ClassPool
    from metalearn.tasks.sinusoid import SineOrLineTasks

    named = (r"^maml: the batch's inputs are torch.float32 and the network's weights torch.float64; "
             r"{}\(..., dtype=torch.float64\) draws it so, or convert the learner \(learner.to\(torch.float32\)\)$")
    learner = MAML(MLP(1, 1, hidden=(8,)), MAML.Config(inner_lr=0.01)).double()
    config = resolve_config("maml", task={"dataset": "sinusoid"}, train={"steps": 3, "meta_batch_size": 2,
                                                                         "val_every": 0})
    with pytest.raises(MetalearnError, match=named.format("SinusoidTasks")):
        Trainer(config, learner, SinusoidTasks(), None, tmp_path / "refused").fit(progress=False)
    with pytest.raises(MetalearnError, match=named.format("SineOrLineTasks")):
        evaluate(learner, SineOrLineTasks(), 2, progress=False)

    class Own:  # a source of one's own, without a dtype
        def sample(self, num_tasks, generator, tasks=None):
            return SinusoidTasks().sample(num_tasks, generator, tasks)

    with pytest.raises(MetalearnError, match=r"; convert the batch \(batch.to\(torch.float64\); EpisodeSampler.*"
                                             r"; the Trainer and evaluate draw under torch's float32 default"):
        evaluate(learner, Own(), 2, progress=False)
    with pytest.raises(MetalearnError, match=r"; convert the batch \(batch.to\(torch.float64\); EpisodeSampler"):
        learner.meta_loss(SinusoidTasks().sample(2, torch.Generator().manual_seed(0)))
    images = torch.randint(0, 255, (6, 3, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sampler = EpisodeSampler(images, ClassPool("test", torch.arange(6), torch.zeros(6, dtype=torch.long)), 3, 1, 1)
    conv = MAML(Conv4(1, 3, hidden=8), MAML.Config(inner_lr=0.01)).double()
    with pytest.raises(MetalearnError, match=named.format("EpisodeSampler")):
        evaluate(conv, sampler, 2, progress=False)
    wide = EpisodeSampler(images, sampler.pool, 3, 1, 1, dtype=torch.float64)  # the advice taken: scored
    assert 0 <= evaluate(conv, wide, 2, progress=False)["mean"] <= 100

    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    trainer = Trainer(config, learner, SinusoidTasks(dtype=torch.float64), None, tmp_path / "run")
    trainer.fit(progress=False)
    assert trainer.step == 3 and {p.dtype for p in learner.parameters()} == {torch.float64}
    assert any(not torch.equal(p, before[name]) for name, p in learner.named_parameters())
    for source in (SinusoidTasks(dtype=torch.float64), SineOrLineTasks(dtype=torch.float64)):
        result = evaluate(learner, source, 4, progress=False)
        assert result["metric"] == "mse" and math.isfinite(result["mean"])


@pytest.mark.parametrize("steps", [1, 3])
def test_a_one_task_batch_runs_second_order_with_the_native_kernel_and_the_right_meta_gradient(monkeypatch, steps):
    """``--task-chunk 1``: a batch of one task skips vmap, so second-order MAML uses torch's native
    batch norm (right outside vmap, less memory); its meta-gradient equals the reference and
    finite differences, independent of both kernels."""
    from metalearn.models import norm

    native_calls = []
    native = F.batch_norm

    def counting(*args, **kwargs):
        if torch.is_grad_enabled():
            native_calls.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(norm.F, "batch_norm", counting)
    monkeypatch.setattr(norm, "batch_stat_norm", lambda *args: pytest.fail("the decomposed batch norm ran"))
    model, batch, forward = conv_problem(tasks=1)
    maml = MAML(model, MAML.Config(inner_lr=0.4, inner_steps=steps))
    loss, grads = maml_grads(maml, batch)
    assert native_calls
    ref_loss, expected = ref_grads(model, forward, batch, steps, 0.4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert_grads_close(grads, expected, rtol=1e-9, atol=1e-12)
    named = dict(zip([n for n, _ in model.named_parameters()], grads))
    for name in ("features.0.0.weight", "features.0.1.bias", "head.weight"):
        param = dict(model.named_parameters())[name]
        numeric = central_difference(lambda: maml.meta_loss(batch)[0], param, 0)
        assert named[name].view(-1)[0].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8), name


TASK_BATCHED_NETWORKS = {
    "conv4": lambda: Conv4(1, 3, hidden=4),
    "reference": lambda: Conv4(1, 3, hidden=4, norm_scale=False, norm_eps=1e-3),
    "maxpool-leaky": lambda: Conv4(1, 3, hidden=4, pooling="max", leaky=True),
    "flat-map": lambda: Conv4(1, 3, hidden=4, pooling="max", flat_map=(1, 1)),
}


@pytest.mark.parametrize("network", TASK_BATCHED_NETWORKS)
def test_forward_tasks_equals_forward_on_each_task_with_its_own_weights(network):
    torch.manual_seed(0)
    model = TASK_BATCHED_NETWORKS[network]().double()
    assert model.can_forward_tasks()
    weights = {name: p.detach() + 0.1 * torch.randn(3, *p.shape, dtype=p.dtype) for name, p in model.named_parameters()}
    x = torch.rand(3, 5, 1, 16, 16, dtype=torch.float64)
    expected = torch.stack([torch.func.functional_call(model, {n: w[t] for n, w in weights.items()}, (x[t],))
                            for t in range(3)])
    torch.testing.assert_close(model.forward_tasks(weights, x), expected, rtol=1e-12, atol=1e-12)
    embedding = Conv4(1, None, hidden=4).double()  # no head: the features of each task
    weights = {name: p.detach().expand(3, *p.shape) for name, p in embedding.named_parameters()}
    torch.testing.assert_close(embedding.forward_tasks(weights, x), torch.stack([embedding(x[t]) for t in range(3)]))


@pytest.mark.parametrize("tasks", [3, 1])
@pytest.mark.parametrize("options", [
    {}, {"first_order": True}, {"learn_inner_lr": True}, {"learn_inner_lr": True, "first_order": True},
    {"multi_step_loss": True, "inner_steps": 3}, {"adapt_norm": False}, {"inner_steps": 3},
], ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("network", TASK_BATCHED_NETWORKS)
def test_the_task_batched_path_equals_vmap_and_the_reference(network, options, tasks):
    """MAML's path through a network's ``forward_tasks`` (Conv4), with the native batch norm
    outside vmap: the same meta-loss, metrics and meta-gradient as the vmap path (one task: the
    functional one-task path), float64, for every option the path takes, at both orders (also
    second order over several tasks, which meta_loss leaves to vmap); the vmap path is itself
    tested against the independent reference loop and finite differences above."""
    torch.manual_seed(0)
    model = TASK_BATCHED_NETWORKS[network]().double()
    batch = image_batch(tasks=tasks, ways=3, shots=2, query=2, size=16, seed=0)
    config = MAML.Config(**{"inner_lr": 0.3, "inner_steps": 2, **options})
    batched = MAML(model, config).double()
    loss, metrics = batched._meta_loss_tasks_batched(batch, batched.step_weights())
    grads = torch.autograd.grad(loss, list(batched.parameters()))

    other = copy.deepcopy(model)
    other.can_forward_tasks = lambda: False
    with_vmap = MAML(other, config).double()
    with_vmap.load_state_dict(batched.state_dict())
    expected_loss, expected_metrics = with_vmap.meta_loss(batch)
    expected = torch.autograd.grad(expected_loss, list(with_vmap.parameters()))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    assert metrics.keys() == expected_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], expected_metrics[key], rtol=1e-6, atol=1e-12)  # accuracy: float32
    assert_grads_close(grads, expected, rtol=1e-9, atol=1e-12)
    assert relative_difference(grads, expected) < 1e-10


@pytest.mark.parametrize("first_order,tasks,taken", [(True, 3, True), (True, 1, True), (False, 1, True),
                                                     (False, 3, False)])
def test_meta_loss_takes_the_task_batched_path_for_first_order_and_single_tasks(monkeypatch, first_order, tasks,
                                                                                 taken):
    """Where it was measured faster: first order, and one task (``--task-chunk 1``); second order
    over several tasks stays on vmap. Without gradients (no meta-gradient to take) it is not used."""
    model = Conv4(1, 3, hidden=4).double()
    calls = []
    forward_tasks = model.forward_tasks
    monkeypatch.setattr(model, "forward_tasks", lambda *a: calls.append(1) or forward_tasks(*a))
    maml = MAML(model, MAML.Config(inner_lr=0.3, first_order=first_order))
    batch = image_batch(tasks=tasks, ways=3, shots=2, query=2, size=16, seed=0)
    maml.meta_loss(batch)
    assert bool(calls) == taken
    calls.clear()
    with torch.no_grad():
        maml.meta_loss(batch)
    assert not calls


def test_per_step_batch_norm_keeps_the_vmap_path():
    """MAML++'s per-step batch-norm sets are chosen by the inner step: forward_tasks does not
    model them, so the network says it cannot batch the tasks and MAML uses vmap."""
    model = Conv4(1, 3, hidden=4)
    assert model.can_forward_tasks()
    maml = MAML(model, MAML.Config(inner_lr=0.1, per_step_bn_weights=True))
    assert not model.can_forward_tasks() and not maml._tasks_batched_by_model()
    maml.meta_loss(image_batch(tasks=2, ways=3, shots=2, query=2, size=16, dtype=torch.float32))[0].backward()


@pytest.mark.parametrize("options", [{}, {"learn_inner_lr": True}, {"adapt_norm": False}, {"test_inner_steps": 0}],
                         ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("network", TASK_BATCHED_NETWORKS)
def test_predictions_through_forward_tasks_equal_those_under_vmap(network, options):
    """Evaluation (predict_per_step) runs through the network's forward_tasks too: the same
    predictions after every test-time step as the vmap path, also under no_grad (as evaluate
    calls it), and the parameters untouched."""
    torch.manual_seed(0)
    model = TASK_BATCHED_NETWORKS[network]().double()
    batch = image_batch(tasks=3, ways=3, shots=2, query=2, size=16, seed=1)
    config = MAML.Config(**{"inner_lr": 0.3, "test_inner_steps": 2, **options})
    batched = MAML(model, config).double().eval()
    with torch.no_grad():
        predictions = batched.predict_per_step(batch)
    other = copy.deepcopy(model)
    other.can_forward_tasks = lambda: False
    with_vmap = MAML(other, config).double().eval()
    with_vmap.load_state_dict(batched.state_dict())
    with torch.no_grad():
        expected = with_vmap.predict_per_step(batch)
    assert predictions.shape == expected.shape == (config.test_inner_steps + 1, 3, 6, 3)
    torch.testing.assert_close(predictions, expected, rtol=1e-10, atol=1e-12)
    assert not predictions.requires_grad
    assert all(p.grad is None and p.requires_grad for p in batched.parameters())


@pytest.mark.parametrize("options", [{}, {"per_step_bn_weights": True, "per_step_bn_statistics": True,
                                          "learn_inner_lr": True, "eval_bn_statistics": "running"}],
                         ids=["forward_tasks", "maml++-vmap"])
def test_predict_is_the_last_step_of_predict_per_step_for_one_query_pass(options):
    """``predict`` (training's validation, ``per_step=False``) runs the query pass after the
    last inner step alone: exactly the last entry of ``predict_per_step``, with one query pass
    instead of steps + 1. Both paths: the network's forward_tasks and vmap (MAML++'s per-step
    batch norm, here evaluated with its running statistics)."""
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4).double()
    steps = 3
    maml = MAML(model, MAML.Config(inner_lr=0.3, inner_steps=steps, test_inner_steps=steps, **options)).double().eval()
    assert maml._tasks_batched_by_model() == (not options)
    batch = image_batch(tasks=3, ways=3, shots=2, query=4, size=16, seed=1)  # 6 support, 12 query images a task
    calls = []  # the number of images of each forward pass: 6 support or 12 query a task
    if options:  # vmap: the network called once per pass (functional_call), on one task's images
        model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    else:
        forward = model.forward_tasks
        model.forward_tasks = lambda params, x: calls.append(x.shape[1]) or forward(params, x)
    with torch.no_grad():
        per_step = maml.predict_per_step(batch)
        per_step_calls, calls[:] = list(calls), []
        final = maml.predict(batch)
    assert torch.equal(final, per_step[-1])
    assert not torch.equal(per_step[0], per_step[-1])
    assert per_step_calls.count(12) == steps + 1 and calls.count(12) == 1  # query passes
    assert per_step_calls.count(6) == calls.count(6) == steps  # inner steps


# every method of task batches (not of MDPs), each with its Config's defaults unless named here
EMPTY_QUERY_OPTIONS: dict[str, dict] = {}


@pytest.mark.parametrize("method", [name for name, cls in METHODS.items() if not cls.reinforcement])
def test_an_empty_query_set_predicts_nothing_without_failing(method):
    """A task with no query examples gives (tasks, 0, ways): Conv4's batched forward pass inferred
    a size from 0 examples and failed inside torch for the methods that adapt its head."""
    from metalearn.algorithms import build_learner
    from metalearn.tasks.batch import Problem

    options = EMPTY_QUERY_OPTIONS.get(method, {})
    try:
        learner = build_learner(method, options, Problem((1, 28, 28), 5, True)).eval()
    except Exception as err:  # a new method that needs options of its own here
        pytest.fail(f"{method} with options {options} cannot be built for 5-way tasks of 1x28x28 images "
                    f"({type(err).__name__}: {err}); give it options in EMPTY_QUERY_OPTIONS of {__file__}")
    support_x, support_y = torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1)
    batch = TaskBatch(support_x, support_y, support_x[:, :0], support_y[:, :0], ways=5)
    assert learner.predict(batch).shape == (2, 0, 5)


def test_first_order_without_inner_steps_is_refused_by_the_inner_step_count(capsys):
    """Supervised MAML has no step-free variant: ``inner_steps`` 0 is refused on its own, with
    ``first_order`` or without, so the combination never passes silently."""
    from cli_runner import run
    from metalearn.errors import ConfigError

    for first_order in (False, True):
        with pytest.raises(ConfigError, match=r"^MAML.Config.inner_steps must be at least 1, got 0$"):
            MAML.Config(inner_steps=0, first_order=first_order)
    code, out, err = run(["train", "maml", "--dataset", "sinusoid", "--inner-steps", 0, "--first-order",
                          "--steps", 1, "--print-config"], capsys)
    assert (code, out, err) == (2, "", "error: --inner-steps must be at least 1, got 0\n")


@pytest.mark.parametrize("first_order", [True, False])
def test_a_subclass_inner_loop_is_used_in_training_and_prediction_on_conv4(first_order):
    """Conv4's task-batched forward skips ``adapt``: a subclass that replaces it (another inner
    loss) is taken through it everywhere instead, and its loss is the one trained and predicted with."""
    calls = []

    class Smoothed(MAML):
        def adapt(self, params, support_x, support_y, steps):
            calls.append(support_x.shape)
            return super().adapt(params, support_x, support_y, steps)

    batch = image_batch(tasks=2, size=28, dtype=torch.float32)
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=8)
    config = MAML.Config(inner_lr=0.4, inner_steps=1, first_order=first_order)
    own, plain = Smoothed(model, config), MAML(copy.deepcopy(model), config)
    assert plain._tasks_batched_by_model() and not own._tasks_batched_by_model()
    loss, _ = own.meta_loss(batch)
    assert len(calls) == 1  # once, vmapped over the tasks
    torch.testing.assert_close(loss, plain.meta_loss(batch)[0], rtol=1e-5, atol=1e-6)  # the same inner loop
    calls.clear()
    torch.testing.assert_close(own.predict(batch), plain.predict(batch), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1


def test_adapt_refuses_a_set_it_would_misread_in_one_line():
    batch = image_batch(tasks=2, size=16, dtype=torch.float32)
    maml = MAML(Conv4(1, 3, hidden=4), MAML.Config(inner_steps=1))
    params = dict(maml.model.named_parameters())
    x, y = batch.support_x[0], batch.support_y[0]
    for args, message in [
        ((list(params.values()), x, y), "MAML.adapt takes the parameters as a dict of name -> tensor"),
        ((params, batch.support_x, batch.support_y), "adapts to one task: its class ids are (n,), got shape (2, 6)"),
        ((params, x, y.float()), "real targets are (n, outputs), got shape (6,)"),
        ((params, x, y.int()), "class labels are torch.long ids, got torch.int32"),
        ((params, x[:4], y), "support_x holds 4 examples and support_y 6"),
    ]:
        with pytest.raises(MetalearnError) as info:
            maml.adapt(*args, 1)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert len(maml.adapt(params, x, y, 2)) == 3


def test_batch_stat_norms_puts_batch_statistics_in_place_of_torchs_batch_norm():
    """A network of one's own with nn.BatchNorm layers (running statistics, refused as such):
    batch_stat_norms swaps each for a BatchStatNorm with its scale and offset, nested ones too,
    which normalises as torch's layer does in training and meta-learns at second order."""
    from metalearn.models import batch_stat_norms

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, affine=False)),
                        nn.Flatten(), nn.LazyLinear(3))
    batch = image_batch(tasks=2, size=8, dtype=torch.float32)
    net(batch.support_x[0])  # the lazy layer's size
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.uniform_(-1.0, 1.0)
    with pytest.raises(MetalearnError, match="batch_stat_norms\\(model\\) swaps them in"):
        MAML(net, MAML.Config())
    expected = net.train()(batch.support_x[0])
    assert batch_stat_norms(net) is net
    assert isinstance(net[1], BatchStatNorm) and isinstance(net[3][1], BatchStatNorm) and net[3][1].weight is None
    assert not net[3][1].bias.requires_grad and not list(net.buffers())  # no running statistics
    torch.testing.assert_close(net(batch.support_x[0]), expected, rtol=1e-5, atol=1e-5)
    loss, _ = MAML(net, MAML.Config(inner_steps=1)).meta_loss(batch)  # second order: accepted now
    loss.backward()
    assert net[1].weight.grad is not None and torch.isfinite(loss)
    wide = batch_stat_norms(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double())  # the layer's dtype kept
    assert wide[1].weight.dtype == torch.float64 and wide(torch.randn(5, 3, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(MetalearnError, match="replaces the batch-norm layers inside a network"):
        batch_stat_norms(nn.BatchNorm2d(3))


def test_inner_steps_beyond_any_sensible_number_are_refused_before_they_run_for_days(capsys):
    """A mistyped 10**8 test_inner_steps (a received config, --set) ran an evaluation for days
    without a word: refused in one line, as the option is spelled."""
    from cli_runner import run

    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--inner-steps", 200_000, "--print-config"], capsys)
    assert code == 2 and err == ("error: --inner-steps must be at most 100000 (each step a pass over the support set), "
                                 "got 200000\n")
    from metalearn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"test_inner_steps must be at most 100000 .*got 100000000$"):
        MAML(MLP(1, 1), {"test_inner_steps": 10**8})
