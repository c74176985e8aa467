"""PLATIPUS (Finn, Xu & Levine 2018) against independent computations, and the uncertainty
measures on hand-computed cases.

The reference below shares no code with ``metalearn.algorithms.platipus``: networks are applied
through their own functional forwards (tests/test_maml.py), gradients come from
``torch.autograd.grad(create_graph=True)``, KL terms from ``torch.distributions`` and tasks and
samples are Python loops.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from metalearn.algorithms import METHODS
from metalearn.algorithms.platipus import PLATIPUS, diagonal_gaussian_kl
from metalearn.api import evaluate_run, resolve_config, train
from metalearn.errors import MetalearnError
from metalearn.models import MLP
from metalearn.tasks.batch import TaskBatch
from metalearn.tasks.sinusoid import SineOrLineTasks
from metalearn.uncertainty import (compare_learners, coverage, expected_calibration_error,
                                   negative_log_likelihood, predictive_log_likelihood, predictive_samples)
from batches import double
from reference import central_difference, conv_problem, mlp_forward, ref_adapt, ref_task_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def compare_runs(platipus_run, maml_run, **options):
    """compare_learners of a PLATIPUS and a MAML run, keyed "platipus" and "maml"."""
    return compare_learners({"platipus": platipus_run, "maml": maml_run}, **options)


# -- the independent reference -----------------------------------------------------------------


def ref_shift(forward, mean, x, y, step, first_order=False):
    """mean - step * grad_mean L(mean, (x, y)), differentiable (create_graph); first order: the
    gradient a constant (no second derivative; mean and step still get theirs)."""
    names = list(mean)
    grads = torch.autograd.grad(ref_task_loss(forward(mean, x), y), [mean[n] for n in names],
                                create_graph=not first_order)
    if first_order:
        grads = [g.detach() for g in grads]
    return {n: mean[n] - step * g for n, g in zip(names, grads)}


def ref_kl(mean_q, std_q, mean_p, std_p):
    return sum(kl_divergence(Normal(mean_q[n], std_q[n]), Normal(mean_p[n], std_p[n])).sum() for n in mean_q)


def ref_meta_loss(learner: PLATIPUS, forward, batch: TaskBatch, noise, first_order=False):
    """Algorithm 1 line 11 spelled out per task and per sample: mean over tasks of the mean query
    loss of the adapted samples + kl_weight * KL(q || p), with the given standard-normal noise
    ``{name: (tasks, samples, *shape)}``; ``first_order``: every inner gradient (the shifts of q's
    and p's means, the steps from theta) a constant. Returns (loss, accuracy): for
    classification the fraction of query examples whose class has the highest mean probability
    over the samples, else None."""
    config = learner.config
    mean = dict(learner.model.named_parameters())
    std_q = {n: learner.log_posterior_std[n.replace(".", "__")].exp() for n in mean}
    std_p = {n: learner.log_prior_std[n.replace(".", "__")].exp() for n in mean}
    lr = lambda name, step: config.inner_lr  # noqa: E731
    losses, right = [], 0
    for t in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        mean_q = ref_shift(forward, mean, qx, qy, learner.posterior_step, first_order)
        mean_p = ref_shift(forward, mean, sx, sy, learner.prior_step, first_order)
        query, probabilities = [], 0
        for s in range(config.train_samples):
            theta = {n: mean_q[n] + std_q[n] * noise[n][t, s] for n in mean}
            phi = ref_adapt(forward, theta, sx, sy, config.inner_steps, lr, first_order=first_order)[-1]
            logits = forward(phi, qx)
            query.append(ref_task_loss(logits, qy))
            if batch.is_classification:
                probabilities = probabilities + torch.softmax(logits.detach(), -1) / config.train_samples
        if batch.is_classification:
            right += int((probabilities.argmax(-1) == qy).sum())
        losses.append(torch.stack(query).mean() + config.kl_weight * ref_kl(mean_q, std_q, mean_p, std_p))
    accuracy = right / batch.query_y.numel() if batch.is_classification else None
    return torch.stack(losses).mean(), accuracy


def sine_or_line_problem(tasks=3, hidden=(8, 8), seed=0):
    torch.manual_seed(seed)
    model = MLP(1, 1, hidden).double()
    batch = double(SineOrLineTasks(shots=5, query=6).sample(tasks, torch.Generator().manual_seed(seed)))
    return model, batch, mlp_forward


PROBLEMS = {"sine-or-line-mlp": (sine_or_line_problem, 0.01), "conv4": (functools.partial(conv_problem, tasks=2), 0.4)}


def make_learner(model, lr, **options) -> PLATIPUS:
    config = {"inner_lr": lr, "prior_step_init": 0.7 * lr, "posterior_step_init": 1.3 * lr, "std_init": 0.05,
              "kl_weight": 0.5, "inner_steps": 2, "test_inner_steps": 2, "train_samples": 3, **options}
    learner = PLATIPUS(model, PLATIPUS.Config(**config)).double()
    with torch.no_grad():  # distinct stds per weight and for p and q, so a mix-up shows
        for table in (learner.log_prior_std, learner.log_posterior_std):
            for value in table.values():
                value.add_(torch.empty_like(value).uniform_(-0.5, 0.5))
    return learner


# -- the KL term -------------------------------------------------------------------------------


def test_diagonal_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,), "c": ()}
    mean_q, mean_p, log_q, log_p = ({n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
                                    for _ in range(4))
    ours = diagonal_gaussian_kl(mean_q, log_q, mean_p, log_p)
    expected = ref_kl(mean_q, {n: v.exp() for n, v in log_q.items()}, mean_p, {n: v.exp() for n, v in log_p.items()})
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert ours > 0
    same = diagonal_gaussian_kl(mean_q, log_q, mean_q, log_q)
    assert abs(float(same)) < 1e-12  # KL(q || q) = 0


@pytest.mark.parametrize("problem", PROBLEMS)
def test_learner_kl_is_closed_form_between_posterior_and_prior(problem):
    make, lr = PROBLEMS[problem]
    model, batch, forward = make()
    learner = make_learner(model, lr)
    mean = dict(model.named_parameters())
    std = lambda table: {n: table[n.replace(".", "__")].exp() for n in mean}  # noqa: E731
    for t, kl in enumerate(learner.kl(batch)):
        mean_q = ref_shift(forward, mean, batch.query_x[t], batch.query_y[t], learner.posterior_step)
        mean_p = ref_shift(forward, mean, batch.support_x[t], batch.support_y[t], learner.prior_step)
        expected = ref_kl(mean_q, std(learner.log_posterior_std), mean_p, std(learner.log_prior_std))
        torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-10)


# -- the posterior and prior updates -------------------------------------------------------------


def test_posterior_mean_is_mu_minus_gamma_q_times_query_gradient_on_a_linear_model():
    """q's mean for y = w x + b under the squared error, by hand: dL/dw = mean(2 r x),
    dL/db = mean(2 r) with r = w x + b - y."""
    model = nn.Linear(1, 1).double()
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.fill_(-1.0)
    learner = PLATIPUS(model, PLATIPUS.Config(inner_lr=0.1, posterior_step_init=0.05, prior_step_init=0.1,
                                              model="mlp")).double()
    x = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    r = 0.5 * x - 1.0 - y  # residuals -0.5, -1.5
    dw, db = float((2 * r * x).mean()), float((2 * r).mean())
    assert (dw, db) == pytest.approx((-5.0, -2.0))
    shifted = learner.shifted_mean(dict(model.named_parameters()), x, y, learner.posterior_step)
    shifted = {name: float(value.detach()) for name, value in shifted.items()}
    assert shifted["weight"] == pytest.approx(0.5 - 0.05 * dw)  # 0.75
    assert shifted["bias"] == pytest.approx(-1.0 - 0.05 * db)  # -0.9
    # against the gradient: the query loss drops at q's mean
    loss = lambda w, b: float(((w * x + b - y) ** 2).mean())  # noqa: E731
    assert loss(shifted["weight"], shifted["bias"]) < loss(0.5, -1.0)


# -- the meta-loss and its gradient --------------------------------------------------------------


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_meta_loss_and_gradient_match_reference(problem, first_order):
    make, lr = PROBLEMS[problem]
    model, batch, forward = make(**({"query": 4, "seed": 1} if problem == "conv4" else {}))
    learner = make_learner(model, lr, first_order=first_order)
    torch.manual_seed(7)
    loss, metrics = learner.meta_loss(batch)
    torch.manual_seed(7)  # meta_loss draws its noise first, from the global generator
    noise = learner.standard_normal(batch.num_tasks, learner.config.train_samples)
    expected, accuracy = ref_meta_loss(learner, forward, batch, noise, first_order)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["query_loss"] + 0.5 * metrics["kl"], loss.detach(), rtol=1e-10, atol=1e-12)
    if batch.is_classification:  # the mixture of the 3 samples, on 2 tasks x 12 queries: 11 right here,
        # where the samples alone get 12, 8 and 12, and the prior mean unadapted 6
        assert float(metrics["accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    else:
        assert "accuracy" not in metrics

    params = list(learner.parameters())
    names = [n for n, _ in learner.named_parameters()]
    grads = torch.autograd.grad(loss, params)
    expected_grads = torch.autograd.grad(expected, params)
    for name, a, e in zip(names, grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-10, msg=name)
    # every meta-parameter of Algorithm 1 line 1 learns: mu, sigma, v_q, gamma_p, gamma_q
    by_name = dict(zip(names, grads))
    for group in ("model.", "log_prior_std.", "log_posterior_std.", "prior_step", "posterior_step"):
        assert any(g.abs().sum() > 0 for n, g in by_name.items() if n.startswith(group)), group
    if first_order:  # dropping the second derivatives changes the meta-gradient
        second = torch.autograd.grad(ref_meta_loss(learner, forward, batch, noise)[0], params)
        flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
        assert float((flat(grads) - flat(second)).norm() / flat(second).norm()) > 1e-3


def test_meta_loss_gradient_matches_central_finite_differences():
    model, batch, forward = sine_or_line_problem(tasks=2, hidden=(3,))
    learner = make_learner(model, 0.01, inner_steps=1, train_samples=2)

    def loss_value():
        torch.manual_seed(3)
        return learner.meta_loss(batch)[0]

    grads = torch.autograd.grad(loss_value(), [learner.prior_step, learner.posterior_step, model.net[0].weight])
    for param, grad in zip([learner.prior_step, learner.posterior_step, model.net[0].weight], grads):
        for i in range(min(param.numel(), 2)):
            numeric = central_difference(loss_value, param, i)
            assert grad.view(-1)[i].item() == pytest.approx(numeric, rel=1e-5, abs=1e-7), (param.shape, i)


# -- sampling at test time (Algorithm 2) ---------------------------------------------------------


@pytest.mark.parametrize("problem", PROBLEMS)
def test_samples_shapes_reproducibility_and_algorithm_2(problem):
    make, lr = PROBLEMS[problem]
    model, batch, forward = make()
    learner = make_learner(model, lr, num_samples=4)
    out = batch.ways if batch.is_classification else 1
    n_query = batch.query_x.shape[1]

    samples = learner.sample_predictions(batch, 5, torch.Generator().manual_seed(1))
    assert samples.shape == (5, batch.num_tasks, n_query, out)
    assert not samples.requires_grad
    assert torch.equal(samples, learner.sample_predictions(batch, 5, torch.Generator().manual_seed(1)))
    assert not torch.allclose(samples, learner.sample_predictions(batch, 5, torch.Generator().manual_seed(2)))
    assert not torch.allclose(samples[0], samples[1])  # distinct models per task
    torch.manual_seed(4)
    a = learner.predict(batch)
    torch.manual_seed(4)
    assert torch.equal(a, learner.predict(batch))
    per_step = learner.predict_per_step(batch)
    assert per_step.shape == (learner.config.test_inner_steps + 1, batch.num_tasks, n_query, out)
    # the final predictions alone (one query pass, not steps + 1): the last step's, from the same noise
    torch.manual_seed(4)
    torch.testing.assert_close(a, learner.predict_per_step(batch)[-1], rtol=0, atol=0)
    torch.testing.assert_close(samples, learner.sample_predictions_per_step(batch, 5, torch.Generator().manual_seed(1))[-1],
                               rtol=0, atol=0)

    # Algorithm 2 by hand: theta = mu - gamma_p grad L(mu, D_tr) + sigma * eps, then 2 steps
    noise = learner.standard_normal(batch.num_tasks, 5, torch.Generator().manual_seed(1))
    mean = dict(model.named_parameters())
    for t in range(batch.num_tasks):
        mean_p = ref_shift(forward, mean, batch.support_x[t], batch.support_y[t], learner.prior_step)
        for s in range(5):
            theta = {n: mean_p[n] + learner.log_prior_std[n.replace(".", "__")].exp() * noise[n][t, s] for n in mean}
            phi = ref_adapt(forward, theta, batch.support_x[t], batch.support_y[t], 2,
                            lambda name, step: lr, first_order=True)[-1]
            torch.testing.assert_close(samples[s, t], forward(phi, batch.query_x[t]).detach(), rtol=1e-8, atol=1e-10)

    # predict averages the sampled models: outputs for regression, probabilities for classification
    torch.manual_seed(9)
    prediction = learner.predict(batch)
    torch.manual_seed(9)
    drawn = learner.sample_predictions(batch)  # config.num_samples = 4 from the same noise
    assert drawn.shape[0] == 4
    if batch.is_classification:
        torch.testing.assert_close(prediction.exp(), drawn.softmax(-1).mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(prediction.exp().sum(-1), torch.ones(prediction.shape[:-1], dtype=torch.float64))
    else:
        torch.testing.assert_close(prediction, drawn.mean(0), rtol=1e-12, atol=1e-12)


def test_prior_std_sets_the_spread_of_the_samples():
    model, batch, _ = sine_or_line_problem(tasks=2)
    narrow = make_learner(model, 0.01, std_init=1e-4)
    with torch.no_grad():
        for value in narrow.log_prior_std.values():
            value.fill_(math.log(1e-4))
    spread_narrow = narrow.sample_predictions(batch, 8, torch.Generator().manual_seed(0)).std(0).mean()
    with torch.no_grad():
        for value in narrow.log_prior_std.values():
            value.fill_(math.log(0.3))
    spread_wide = narrow.sample_predictions(batch, 8, torch.Generator().manual_seed(0)).std(0).mean()
    assert spread_wide > 100 * spread_narrow


# -- learning ----------------------------------------------------------------------------------


def test_sine_or_line_training_lowers_the_negative_bound():
    torch.manual_seed(0)
    tasks = SineOrLineTasks(shots=5, query=10)
    held_out = tasks.sample(200, torch.Generator().manual_seed(1234))
    learner = PLATIPUS(MLP(), PLATIPUS.Config(inner_lr=0.01, inner_steps=1, test_inner_steps=1, kl_weight=0.036,
                                              prior_step_init=0.01, posterior_step_init=0.01, std_init=0.05,
                                              model="mlp"))

    def held_out_bound():
        torch.manual_seed(99)  # the same noise before and after
        with torch.no_grad():
            _, metrics = learner.meta_loss(held_out)
        return float(metrics["loss"]), float(metrics["query_loss"])

    before = held_out_bound()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(200):
        torch.manual_seed(step)
        loss, _ = learner.meta_loss(tasks.sample(10, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_bound()
    # about 8.8 -> 4.4 (query loss 8.5 -> 3.6, while the KL grows from 7 to 20)
    assert after[0] < 0.7 * before[0], (before, after)
    assert after[1] < 0.7 * before[1], (before, after)


# -- uncertainty measures ------------------------------------------------------------------------


def test_expected_calibration_error_hand_cases():
    # 10 two-class predictions at confidence 0.7: 7 right is calibrated, ECE 0
    probs = torch.tensor([[0.7, 0.3]] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 7 + [1] * 3)
    assert float(expected_calibration_error(probs.log(), labels)) == pytest.approx(0.0, abs=1e-12)
    # the same hits at confidence 0.99: overconfident by 0.29
    over = torch.tensor([[0.99, 0.01]] * 10, dtype=torch.float64)
    assert float(expected_calibration_error(over.log(), labels)) == pytest.approx(0.29)
    # two bins: 4 at 0.9 with 2 right (gap 0.4), 6 at 0.6 with 6 right (gap 0.4): ECE 0.4;
    # logits work as well as log-probabilities
    mixed = torch.tensor([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 6, dtype=torch.float64)
    hits = torch.tensor([0, 0, 1, 1] + [0] * 6)
    assert float(expected_calibration_error(mixed.log() + 3.0, hits)) == pytest.approx(0.4)
    assert float(expected_calibration_error(mixed.log(), hits, bins=1)) == pytest.approx(abs(0.8 - 0.72))


def test_negative_log_likelihood_hand_case():
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    expected = -(math.log(0.7) + math.log(0.2) + math.log(0.5)) / 3
    assert float(negative_log_likelihood(probs.log(), labels)) == pytest.approx(expected)


def test_coverage_of_a_known_band():
    truth = torch.zeros(1, 10, 1)
    # samples -1 and +1 around the truth at the first 6 points, both above it at the last 4
    low = torch.tensor([-1.0] * 6 + [0.5] * 4).view(1, 10, 1)
    high = torch.tensor([1.0] * 6 + [2.0] * 4).view(1, 10, 1)
    samples = torch.stack([low, high, (low + high) / 2])
    assert coverage(samples, truth, "minmax").tolist() == [pytest.approx(0.6)]
    # 101 samples -50..50 at every point: the central 90% interval is [-45, 45]
    spread = torch.arange(-50, 51, dtype=torch.float64).view(-1, 1, 1, 1).expand(-1, 1, 4, 1)
    inside = torch.tensor([0.0, 44.0, -44.9, 46.0], dtype=torch.float64).view(1, 4, 1)
    assert coverage(spread, inside, "interval", level=0.9).tolist() == [pytest.approx(0.75)]
    assert coverage(spread, inside, "minmax").tolist() == [pytest.approx(1.0)]


def test_predictive_log_likelihood_hand_cases():
    y = torch.tensor([[[0.5]]], dtype=torch.float64)
    one = torch.tensor([[[[0.0]]]], dtype=torch.float64)  # a single model (MAML) predicting 0
    gauss = -0.5 * math.log(2 * math.pi * 0.25) - 0.5 * 0.5**2 / 0.25
    assert float(predictive_log_likelihood(one, y, 0.5)) == pytest.approx(gauss)
    assert float(predictive_log_likelihood(one, y, 0.5, "gaussian")) == pytest.approx(gauss)
    two = torch.tensor([0.0, 2.0], dtype=torch.float64).view(2, 1, 1, 1)
    pdf = lambda mu, var: math.exp(-((0.5 - mu) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)  # noqa: E731
    mixture = math.log(0.5 * pdf(0.0, 0.25) + 0.5 * pdf(2.0, 0.25))
    assert float(predictive_log_likelihood(two, y, 0.5)) == pytest.approx(mixture)
    fitted = math.log(pdf(1.0, 1.0 + 0.25))  # mean 1, population variance 1, plus noise
    assert float(predictive_log_likelihood(two, y, 0.5, "gaussian")) == pytest.approx(fitted)
    with pytest.raises(MetalearnError, match="positive noise"):
        predictive_log_likelihood(one, y, 0.0)


# -- the run-level API ---------------------------------------------------------------------------


def test_registered_with_paper_defaults():
    assert METHODS["platipus"] is PLATIPUS
    omniglot = resolve_config("platipus", task={"dataset": "omniglot", "ways": 5, "shots": 1})
    assert omniglot.method_config["model"] == "conv4"
    assert omniglot.method_config["inner_lr"] == 0.4 and omniglot.method_config["test_inner_steps"] == 3
    assert omniglot.train.meta_batch_size == 32
    assert omniglot.method_config["kl_weight"] == pytest.approx(1e-4)  # measured; the bound's 1/5 fails
    regression = resolve_config("platipus", task={"dataset": "sine-or-line"})
    assert regression.method_config["model"] == "mlp" and regression.task.shots == 5
    # MSE over K = 5 query points with noise std 0.3: sum (y - f)^2 / (2 * 0.09) = MSE / 0.036
    assert regression.method_config["kl_weight"] == pytest.approx(0.036)
    noisier = resolve_config("platipus", task={"dataset": "sine-or-line", "noise_std": 0.5, "query": 10})
    assert noisier.method_config["kl_weight"] == pytest.approx(2 * 0.25 / 10)
    # noiseless tasks: a nominal 0.3, not the bound's 0 that would switch the prior off
    for task in ({"dataset": "sinusoid"}, {"dataset": "sine-or-line", "noise_std": 0.0}):
        assert resolve_config("platipus", task=task).method_config["kl_weight"] == pytest.approx(0.036)
    with pytest.raises(MetalearnError, match="PLATIPUS.Config.num_samples"):
        PLATIPUS.Config(num_samples=0)
    with pytest.raises(MetalearnError, match="buffers"):
        PLATIPUS(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)))


def small_regression_config(method: str, steps: int = 20):
    options = {"test_inner_steps": 2, "inner_steps": 1}
    if method == "platipus":
        options.update(num_samples=6, std_init=0.05)
    return resolve_config(method, task={"dataset": "sine-or-line"}, method_config=options,
                          train={"steps": steps, "meta_batch_size": 4, "log_every": 5, "val_every": 10,
                                 "val_episodes": 8, "checkpoint_every": 10, "eval_episodes": 30})


def true_sine_or_line(params, x):
    """Sine-or-line's noiseless function, written out: a line where ``is_line``, else a sine."""
    sine = params["amplitude"].view(-1, 1, 1) * torch.sin(x - params["phase"].view(-1, 1, 1))
    line = params["slope"].view(-1, 1, 1) * x + params["intercept"].view(-1, 1, 1)
    return torch.where(params["is_line"].view(-1, 1, 1) > 0.5, line, sine)


def mean_and_ci95(values):
    return statistics.fmean(values), 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def ref_regression_comparison(learners, task, episodes, chunk, num_samples, grid_points, model_seed):
    """compare_learners' regression measures recomputed: the test episodes of seed 0 in chunks
    of ``chunk``, each learner's sampled models drawn after ``torch.manual_seed(model_seed(k))``
    for chunk k = 1, 2, ... (first at the query points, then on the grid); the measures in
    float64 by hand, per task, then mean and 1.96 standard errors over the tasks."""
    from metalearn.training import TEST_SEED_OFFSET

    source = SineOrLineTasks(shots=task.shots, query=task.query, noise_std=0.3)
    generator = torch.Generator().manual_seed(TEST_SEED_OFFSET)
    grid = torch.linspace(-5.0, 5.0, grid_points).view(1, -1, 1)
    per_task = {label: {} for label in learners}
    var = 0.3**2
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for k, start in enumerate(range(0, episodes, chunk), 1):
            size = min(chunk, episodes - start)
            batch = source.sample(size, generator)
            x = grid.expand(size, -1, -1).contiguous()
            truth = true_sine_or_line(batch.task_params, x)
            on_grid = TaskBatch(batch.support_x, batch.support_y, x, truth, 0, batch.task_params)
            for label, learner in learners.items():
                learner.eval()
                torch.manual_seed(model_seed(k))
                draw = ((lambda b: learner.sample_predictions(b, num_samples)) if label == "platipus"
                        else (lambda b: learner.predict(b).unsqueeze(0)))
                f, y = draw(batch).double(), batch.query_y.double()  # (S, tasks, n, 1), (tasks, n, 1)
                log_normal = -0.5 * math.log(2 * math.pi * var) - (y - f) ** 2 / (2 * var)
                spread = f.var(0, unbiased=False) + var
                gaussian = -0.5 * torch.log(2 * math.pi * spread) - (y - f.mean(0)) ** 2 / (2 * spread)
                g = draw(on_grid).double().numpy()  # the same stream, on to the grid
                low, high = np.quantile(g, [0.025, 0.975], axis=0)
                t = truth.double().numpy()
                scores = {
                    "mse": ((f.mean(0) - y) ** 2).mean((1, 2)),
                    "log_likelihood": (torch.logsumexp(log_normal, 0) - math.log(f.shape[0])).mean((1, 2)),
                    "log_likelihood_gaussian": gaussian.mean((1, 2)),
                    "coverage_minmax": ((t >= g.min(0)) & (t <= g.max(0))).mean((1, 2)),
                    "coverage_interval": ((t >= low) & (t <= high)).mean((1, 2)),
                }
                for name, values in scores.items():
                    per_task[label].setdefault(name, []).extend(float(v) for v in values)
    return {label: {name: mean_and_ci95(values) for name, values in measures.items()}
            for label, measures in per_task.items()}


def test_train_evaluate_compare_and_plot_runs(tmp_path):
    run_dir, result = train(small_regression_config("platipus"), tmp_path / "platipus", progress=False,
                            announce=lambda _: None)
    assert result["metric"] == "mse" and len(result["per_step"]) == 3 and result["episodes"] == 30
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "query_loss", "kl", "prior_std"} <= set(records[0])
    # evaluation is reproducible although the method samples
    again = evaluate_run(run_dir, progress=False)
    assert again["scores"] == result["scores"]

    maml_dir, _ = train(small_regression_config("maml"), tmp_path / "maml", progress=False,
                        evaluate_after=False, announce=lambda _: None)
    comparison = compare_runs(run_dir, maml_dir, episodes=20, chunk=8, num_samples=6, grid_points=50)
    assert comparison["episodes"] == 20 and comparison["dataset"] == "sine-or-line"
    # every figure recomputed on the same episodes and model noise: chunks of 8, 8 and 4 tasks,
    # chunk k's samples seeded by TEST_SEED_OFFSET + 7919 k for every run (uncertainty.py)
    from metalearn.checkpoints import load_trained
    from metalearn.training import TEST_SEED_OFFSET

    config, platipus, _ = load_trained(run_dir)
    learners = {"platipus": platipus, "maml": load_trained(maml_dir)[1]}
    expected = ref_regression_comparison(learners, config.task.for_testing(), 20, 8, 6, 50,
                                         lambda k: TEST_SEED_OFFSET + 7919 * k)
    names = ("mse", "log_likelihood", "log_likelihood_gaussian", "coverage_minmax", "coverage_interval")
    for label in ("platipus", "maml"):
        for name in names:
            mean, ci95 = expected[label][name]
            assert comparison[label][name]["mean"] == pytest.approx(mean, rel=1e-5, abs=1e-9), (label, name)
            assert comparison[label][name]["ci95"] == pytest.approx(ci95, rel=1e-5, abs=1e-9), (label, name)
    assert comparison["platipus"]["coverage_interval"]["ci95"] > 0  # not all tasks alike
    # the tolerances tell the model noise apart: eval's stream (TEST_SEED_OFFSET) gives other samples
    other = ref_regression_comparison({"platipus": platipus}, config.task.for_testing(), 20, 8, 6, 50,
                                      lambda k: TEST_SEED_OFFSET)["platipus"]
    assert any(other[name][0] != pytest.approx(expected["platipus"][name][0], rel=1e-5) for name in names)
    # one model covers the true function nowhere; six sampled models cover some of it
    assert comparison["maml"]["coverage_minmax"]["mean"] == 0.0
    assert comparison["platipus"]["coverage_minmax"]["mean"] > 0.0
    assert compare_runs(run_dir, maml_dir, episodes=20, chunk=8, num_samples=6, grid_points=50) == comparison

    from metalearn.plotting_samples import plot_samples
    from metalearn.checkpoints import load_trained

    _, platipus, _ = load_trained(run_dir)
    _, maml, _ = load_trained(maml_dir)
    assert predictive_samples(maml, SineOrLineTasks().sample(2, torch.Generator().manual_seed(0))).shape[0] == 1
    batch = SineOrLineTasks().sample(3, torch.Generator().manual_seed(0))
    path = plot_samples(platipus, batch, SineOrLineTasks.function, tmp_path / "samples.png", other_learner=maml)
    assert path.stat().st_size > 10_000


def test_omniglot_classification_run(tmp_path, omniglot_data_dir):
    config = resolve_config("platipus", task={"dataset": "omniglot", "ways": 3, "shots": 1},
                            method_config={"num_samples": 3, "std_init": 1.0},  # samples far apart
                            train={"steps": 2, "meta_batch_size": 2, "val_every": 0, "log_every": 1,
                                   "eval_episodes": 6})
    run_dir, result = train(config, tmp_path / "run", data_dir=omniglot_data_dir, progress=False,
                            announce=lambda _: None)
    assert result["metric"] == "accuracy" and 0 <= result["mean"] <= 100 and len(result["per_step"]) == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" in records[-1] and "kl" in records[-1]

    maml_config = resolve_config("maml", task={"dataset": "omniglot", "ways": 3, "shots": 1},
                                 train={"steps": 1, "meta_batch_size": 2, "val_every": 0})
    maml_dir, _ = train(maml_config, tmp_path / "maml", data_dir=omniglot_data_dir, progress=False,
                        evaluate_after=False, announce=lambda _: None)
    comparison = compare_runs(run_dir, maml_dir, episodes=6, data_dir=omniglot_data_dir)
    for label in ("platipus", "maml"):
        entry = comparison[label]
        assert set(entry) >= {"accuracy", "nll", "ece"}
        assert 0 <= entry["ece"]["mean"] <= 1 and entry["nll"]["mean"] > 0
    # the same episodes as `metalearn eval` with seed 0 (MAML, deterministic, scores them alike),
    # but not the same sampled models (docs/methods/platipus.md, "Options"): eval draws them from one stream
    # seeded TEST_SEED_OFFSET, compare per chunk from TEST_SEED_OFFSET + 7919 k (k = 1 here)
    from metalearn.tasks import build_task_source
    from metalearn.checkpoints import load_trained
    from metalearn.training import TEST_SEED_OFFSET

    maml_eval = evaluate_run(maml_dir, episodes=6, data_dir=omniglot_data_dir, progress=False)
    assert maml_eval["episodes"] == 6 and comparison["maml"]["accuracy"]["mean"] == pytest.approx(maml_eval["mean"])
    config, platipus, _ = load_trained(run_dir)
    platipus.eval()
    batch = build_task_source(config.task, "test", data_dir=omniglot_data_dir).sample(
        6, torch.Generator().manual_seed(TEST_SEED_OFFSET))

    def mixture_probabilities(model_seed: int) -> torch.Tensor:  # the samples' mean probability
        torch.manual_seed(model_seed)
        with torch.no_grad():
            return platipus.sample_predictions(batch).softmax(-1).mean(0)  # config's 3 samples

    def mixture_accuracy(model_seed: int) -> float:  # % right by the samples' mean probability
        return 100 * float((mixture_probabilities(model_seed).argmax(-1) == batch.query_y).double().mean())

    assert comparison["platipus"]["accuracy"]["mean"] == pytest.approx(mixture_accuracy(TEST_SEED_OFFSET + 7919))
    assert result["mean"] == pytest.approx(mixture_accuracy(TEST_SEED_OFFSET))
    # the two seeds draw other models (so the two checks above tell them apart)
    assert not torch.allclose(mixture_probabilities(TEST_SEED_OFFSET + 7919), mixture_probabilities(TEST_SEED_OFFSET),
                              atol=1e-3)


def test_resume_continues_exactly(tmp_path):
    """The samples of a meta-step come from the trainer's per-step seed, so resuming is exact."""
    from metalearn.training import build_trainer

    straight = build_trainer(small_regression_config("platipus", steps=6), tmp_path / "straight")
    straight.fit(progress=False)
    build_trainer(small_regression_config("platipus", steps=3), tmp_path / "split").fit(progress=False)
    resumed = build_trainer(small_regression_config("platipus", steps=6), tmp_path / "split", resume=True)
    resumed.fit(progress=False)
    a, b = straight.learner.state_dict(), resumed.learner.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("log_prior_std") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    initial = build_trainer(small_regression_config("platipus", steps=6), tmp_path / "fresh").learner.state_dict()
    assert any(not torch.equal(initial[name], a[name]) for name in a)  # the six steps did move the weights


def test_the_plotted_training_accuracy_says_it_saw_the_query_labels():
    """meta_loss's accuracy samples theta from q, shifted on the query labels it is scored on
    (pinned against ref_meta_loss's by test_meta_loss_and_gradient_match_reference): the
    learning-curve panel must not present it as a training accuracy like other methods'."""
    assert "query labels" in PLATIPUS.series_labels({})["accuracy"]


@pytest.mark.parametrize("num_samples", [0, -2, 2.5])
def test_a_number_of_samples_below_one_or_not_whole_is_one_line(num_samples):
    model, batch, _ = sine_or_line_problem(tasks=2)
    learner = make_learner(model, 0.01)
    with pytest.raises(MetalearnError, match="num_samples must be a whole number of at least 1"):
        learner.sample_predictions(batch, num_samples)


def test_compare_records_its_overrides_and_the_models_each_run_drew(tmp_path, capsys, monkeypatch):
    """A comparison's record says what was compared: the options --set changed, and how many
    models each run drew per task (the run's own number where none is asked; MAML one)."""
    from cli_runner import run

    platipus_dir, _ = train(small_regression_config("platipus", steps=2), tmp_path / "platipus", progress=False,
                            evaluate_after=False, announce=lambda _: None)  # num_samples 6, test_inner_steps 2
    maml_dir, _ = train(small_regression_config("maml", steps=2), tmp_path / "maml", progress=False,
                        evaluate_after=False, announce=lambda _: None)
    drawn, steps = [], []
    original = PLATIPUS.sample_predictions

    def counted(self, batch, num_samples=None, generator=None):
        out = original(self, batch, num_samples, generator)
        drawn.append(out.shape[0])
        steps.append(self.config.test_inner_steps)
        return out

    monkeypatch.setattr(PLATIPUS, "sample_predictions", counted)
    small = {"episodes": 4, "chunk": 4, "grid_points": 10}
    own = compare_runs(platipus_dir, maml_dir, **small, overrides={"test_inner_steps": 1})
    assert set(drawn) == {6} and set(steps) == {1}
    assert own["overrides"] == {"test_inner_steps": 1} and own["num_samples"] == 6
    assert own["platipus"]["num_samples"] == 6 and own["maml"]["num_samples"] == 1
    drawn.clear()
    asked = compare_runs(platipus_dir, maml_dir, **small, num_samples=3)
    assert set(drawn) == {3} and asked["num_samples"] == 3 and asked["platipus"]["num_samples"] == 3
    assert asked["overrides"] == {} and asked["maml"]["num_samples"] == 1
    with pytest.raises(MetalearnError, match="cannot label a run 'overrides'"):
        compare_learners({"overrides": platipus_dir}, **small)
    with pytest.raises(MetalearnError, match=r"^runs 'a' and 'b' are one run \(.*\); give each run once$"):
        compare_learners({"a": platipus_dir, "b": Path(platipus_dir) / ".." / Path(platipus_dir).name}, **small)

    out = tmp_path / "compare.json"
    code, printed, err = run(["compare", platipus_dir, maml_dir, "--set", "test_inner_steps=1", "--episodes", 4,
                              "--json", out], capsys)
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["overrides"] == {"test_inner_steps": 1} and record["num_samples"] == 6
    assert record["platipus"]["num_samples"] == 6 and record["maml"]["num_samples"] == 1
    assert "| platipus |" in printed and "num_samples" not in printed  # a record, not a measure column


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures memory through "
                    "/proc/self/clear_refs (Linux)")
def test_compare_scores_a_chunk_too_large_for_the_memory_in_parts(tmp_path, monkeypatch):
    """compare, as evaluate, scores a drawn chunk a few episodes per call where it would not fit
    the memory at once: MAML's measures are the same to float rounding; where it fits, the
    measurement leaves every run's scores as they were, PLATIPUS's sampled ones included."""
    import metalearn.uncertainty

    platipus_dir, _ = train(small_regression_config("platipus", steps=2), tmp_path / "platipus", progress=False,
                            evaluate_after=False, announce=lambda _: None)
    maml_dir, _ = train(small_regression_config("maml", steps=2), tmp_path / "maml", progress=False,
                        evaluate_after=False, announce=lambda _: None)
    small = {"episodes": 5, "chunk": 5, "grid_points": 10}
    fits = compare_runs(platipus_dir, maml_dir, **small)
    calls = []
    real = metalearn.uncertainty.uncertainty_scores
    monkeypatch.setattr(metalearn.uncertainty, "uncertainty_scores",
                        lambda learner, batch, *a: (calls.append(batch.num_tasks), real(learner, batch, *a))[1])
    measure, budgets = metalearn.uncertainty.tasks_per_call, []

    def within(share):  # each run's own --memory-budget (the default 0.8) is what compare is given
        def measured(score, batch, device, budget):
            budgets.append(budget)
            return measure(score, batch, device, share)
        return measured
    monkeypatch.setattr(metalearn.uncertainty, "tasks_per_call", within(1.0))
    again = compare_runs(platipus_dir, maml_dir, **small)
    assert budgets == [0.8, 0.8]
    assert calls == [1, 5, 1, 5] and again["platipus"] == fits["platipus"] and again["maml"] == fits["maml"]
    monkeypatch.setattr(metalearn.uncertainty, "tasks_per_call", within(1e-12))  # room for one episode per call
    calls.clear()
    parts = compare_runs(platipus_dir, maml_dir, **small)
    assert calls == [1, 1, 1, 1, 1, 1] * 2
    for name, value in fits["maml"].items():
        if isinstance(value, dict):  # a measure's mean and interval (its difference from platipus takes
            got = parts["maml"][name]   # platipus's samples, which depend on the chunks, as its docstring says)
            assert {k: v for k, v in got.items() if k != "difference"} == pytest.approx(
                {k: v for k, v in value.items() if k != "difference"}, rel=1e-6), name


def test_sample_probabilities_of_a_float64_learner_are_float64_as_fit_predict_s():
    """sample_probabilities answers in the learner's type as fit_predict does (float64 kept, at
    least float32), and a seed samples the same models in either type (the noise is drawn in
    float32), so a float64 learner's answers are the float32 one's to float32's precision."""
    import copy

    from metalearn.algorithms import build_learner
    from metalearn.tasks.batch import Problem

    pixels = torch.randint(0, 256, (9, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    support, labels, query = pixels[:6], [0, 0, 1, 1, 2, 2], pixels[6:]
    torch.manual_seed(0)
    learner = build_learner("platipus", {"num_samples": 2}, Problem((1, 16, 16), 3, True))
    expected = learner.sample_probabilities(support, labels, query, generator=torch.Generator().manual_seed(1))
    wide = copy.deepcopy(learner).double()
    found = wide.sample_probabilities(support, labels, query, generator=torch.Generator().manual_seed(1))
    assert expected.dtype == torch.float32 and found.dtype == torch.float64
    torch.testing.assert_close(found, expected.double(), rtol=1e-4, atol=1e-5)
