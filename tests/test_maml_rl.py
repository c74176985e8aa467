"""MAML for reinforcement learning: the nav2d environment, the linear feature baseline, the
policy-gradient estimator, conjugate gradient, the Fisher-vector product, the meta-gradient
through the inner step, the TRPO step, resume, learning, and the errors a user sees."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cli_runner import run
from metalearn.algorithms.maml_rl import (MAMLRL, MAMLRLConfig, GaussianMLPPolicy, advantages, baseline_features,
                                          conjugate_gradient, fit_linear_baseline, flat, gaussian_log_prob,
                                          kl_hessian_vector, trpo_step)
from metalearn.envs import MDPBatch, MDPTasks, rollout
from metalearn.envs.nav2d import Nav2D
from metalearn.training import TEST_SEED_OFFSET


def small_learner(dtype=torch.float32, seed=0, **options) -> MAMLRL:
    """A tiny policy. Its biases are drawn away from 0: every episode starts at the origin, where
    zero biases put each ReLU at its kink and the objective is not smooth in them."""
    torch.manual_seed(seed)
    config = MAMLRLConfig(**{"trajectories": 4, "test_trajectories": 4, "horizon": 10, "hidden": 5, **options})
    learner = MAMLRL(GaussianMLPPolicy(2, 2, config.hidden), config).to(dtype)
    with torch.no_grad():
        for name, p in learner.policy.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return learner


def nav_batch(tasks: int, seed: int = 0, dtype=torch.float32) -> MDPBatch:
    return MDPTasks(Nav2D()).sample(tasks, torch.Generator().manual_seed(seed)).to(dtype)


# -- nav2d -----------------------------------------------------------------------------------------


def test_nav2d_step_matches_hand_computed_values():
    env = Nav2D()
    state, obs = env.reset({"goal": torch.tensor([[0.3, -0.2]])}, 1)
    assert obs.tolist() == [[[0.0, 0.0]]]
    # action (0.5, 2.0): velocity (0.05, 0.1 clipped from 0.2); position (0.05, 0.1)
    state, obs, reward, done = env.step(state, torch.tensor([[[0.5, 2.0]]]))
    assert obs[0, 0].tolist() == pytest.approx([0.05, 0.1])
    assert reward.item() == pytest.approx(-math.hypot(0.25, 0.3))
    assert not done.item()
    # within 0.01 of the goal in both coordinates: done, reward minus the remaining distance
    state, obs = env.reset({"goal": torch.tensor([[0.095, -0.003]])}, 1)
    state, obs, reward, done = env.step(state, torch.tensor([[[1.0, 0.0]]]))
    assert done.item() and reward.item() == pytest.approx(-math.hypot(0.005, 0.003))


def test_nav2d_batched_step_equals_a_scalar_loop_over_random_actions_and_goals():
    torch.manual_seed(0)
    env, tasks, trajectories, horizon = Nav2D(), 3, 4, 30
    goals = torch.rand(tasks, 2, dtype=torch.float64) - 0.5
    actions = torch.randn(tasks, trajectories, horizon, 2, dtype=torch.float64) * 1.5
    steps = iter(actions.unbind(2))
    sampled = rollout(env, {"goal": goals}, trajectories, lambda obs: next(steps), horizon)
    for t in range(tasks):
        for n in range(trajectories):
            x = y = 0.0
            alive = 1.0
            for step in range(horizon):
                assert sampled.mask[t, n, step].item() == alive
                ax, ay = actions[t, n, step].tolist()
                x += min(max(0.1 * ax, -0.1), 0.1)
                y += min(max(0.1 * ay, -0.1), 0.1)
                dx, dy = x - goals[t, 0].item(), y - goals[t, 1].item()
                assert sampled.rewards[t, n, step].item() == pytest.approx(-math.hypot(dx, dy) * alive, abs=1e-12)
                if alive and abs(dx) < 0.01 and abs(dy) < 0.01:
                    alive = 0.0


def test_an_episode_that_reaches_the_goal_is_masked_from_then_on():
    env = Nav2D()
    goal = torch.tensor([[0.25, 0.0]])
    sampled = rollout(env, {"goal": goal}, 1, lambda obs: torch.tensor([[[1.0, 0.0]]]) if obs[0, 0, 0] < 0.2
                      else torch.tensor([[[0.5, 0.0]]]), horizon=6)
    # positions 0.1, 0.2, 0.25 (done at the third step), then masked
    assert sampled.mask[0, 0].tolist() == [1, 1, 1, 0, 0, 0]
    assert sampled.rewards[0, 0, 3:].abs().sum() == 0
    assert sampled.returns()[0, 0].item() == pytest.approx(-(0.15 + 0.05 + 0.0), abs=1e-6)


def test_goals_are_uniform_in_the_square_and_depend_only_on_the_seed():
    goals = MDPTasks(Nav2D()).sample(2000, torch.Generator().manual_seed(3)).params["goal"]
    assert goals.min() >= -0.5 and goals.max() <= 0.5
    assert goals.mean(0).abs().max() < 0.03 and (goals.var(0) - 1 / 12).abs().max() < 0.01
    again = MDPTasks(Nav2D()).sample(2000, torch.Generator().manual_seed(3)).params["goal"]
    assert torch.equal(goals, again)


# -- the baseline and the policy gradient ----------------------------------------------------------


def test_linear_baseline_is_the_ridge_least_squares_fit_of_each_task():
    torch.manual_seed(1)
    observations = torch.randn(3, 4, 6, 2, dtype=torch.float64)
    targets = torch.randn(3, 4, 6, dtype=torch.float64)
    mask = torch.ones(3, 4, 6, dtype=torch.float64)
    mask[1, 2, 4:] = 0  # a trajectory that ended early
    fitted = fit_linear_baseline(observations, mask, targets)
    features = baseline_features(observations)
    for t in range(3):
        rows = mask[t].bool()
        x, y = features[t][rows], targets[t][rows]
        # ridge regression as least squares on [X; sqrt(reg) I] w = [y; 0]
        reg = 1e-5
        stacked_x = torch.cat([x, math.sqrt(reg) * torch.eye(x.shape[1], dtype=x.dtype)])
        stacked_y = torch.cat([y, torch.zeros(x.shape[1], dtype=x.dtype)])
        w = torch.linalg.lstsq(stacked_x, stacked_y.unsqueeze(-1)).solution.squeeze(-1)
        torch.testing.assert_close(fitted[t], features[t] @ w, rtol=1e-7, atol=1e-9)
    # a task whose fit fails (a NaN observation) raises its own regulariser, not its neighbours'
    broken = observations.clone()
    broken[0, 1, 2, 0] = float("nan")
    with_broken = fit_linear_baseline(broken, mask, targets)
    assert with_broken[0].isnan().any()
    torch.testing.assert_close(with_broken[1:], fit_linear_baseline(observations[1:], mask[1:], targets[1:]),
                               rtol=1e-12, atol=1e-12)
    # features: obs, obs^2, t/100, (t/100)^2, (t/100)^3, 1
    assert features[0, 0, 3].tolist() == pytest.approx(
        [*observations[0, 0, 3].tolist(), *(observations[0, 0, 3] ** 2).tolist(), 0.03, 0.0009, 0.000027, 1.0])


def test_advantages_are_standardised_returns_minus_baseline_per_task():
    """Against an independent computation, task by task: discounted returns-to-go R_t, minus the
    linear feature baseline fitted by ridge least squares (rllab's features and regulariser) on
    that task's unmasked steps alone, standardised over them (population std + 1e-8), 0 on the
    masked steps. Some trajectories end early, so the mask counts."""
    import dataclasses

    learner = small_learner(torch.float64)
    torch.manual_seed(0)
    sampled = learner._rollout(nav_batch(3, dtype=torch.float64), dict(learner.policy.named_parameters()), False, 4)
    # episodes that reached the goal early: masked from then on, with no reward there
    mask = sampled.mask.clone()
    mask[0, 1, 6:] = 0
    mask[2, 0, 3:] = 0
    mask[2, 3, 8:] = 0
    sampled = dataclasses.replace(sampled, mask=mask, rewards=sampled.rewards * mask)
    tasks, trajectories, horizon = mask.shape
    for discount in (0.99, 0.8):
        adv = advantages(sampled, discount)
        for t in range(tasks):
            returns = torch.zeros(trajectories, horizon, dtype=torch.float64)
            for n in range(trajectories):
                for step in range(horizon):
                    returns[n, step] = sum(discount ** k * sampled.rewards[t, n, step + k].item()
                                           for k in range(horizon - step))
            obs = sampled.observations[t].clamp(-10, 10)
            t100 = (torch.arange(horizon, dtype=torch.float64) / 100).view(1, -1, 1).expand(trajectories, -1, 1)
            features = torch.cat([obs, obs ** 2, t100, t100 ** 2, t100 ** 3, torch.ones_like(t100)], -1)
            rows = mask[t].bool()
            x, y = features[rows], returns[rows]
            reg = 1e-5  # LinearFeatureBaseline's reg_coeff, as least squares on [X; sqrt(reg) I] w = [y; 0]
            stacked_x = torch.cat([x, math.sqrt(reg) * torch.eye(x.shape[1], dtype=x.dtype)])
            stacked_y = torch.cat([y, torch.zeros(x.shape[1], dtype=x.dtype)])
            w = torch.linalg.lstsq(stacked_x, stacked_y.unsqueeze(-1)).solution.squeeze(-1)
            raw = y - x @ w
            expected = torch.zeros(trajectories, horizon, dtype=torch.float64)
            expected[rows] = (raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8)
            torch.testing.assert_close(adv[t], expected, rtol=1e-6, atol=1e-7)
            values = adv[t][rows]
            assert values.mean().item() == pytest.approx(0.0, abs=1e-9)
            assert values.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    rewards_to_go = sampled.rewards_to_go(0.5)
    assert rewards_to_go[0, 0, -2].item() == pytest.approx(
        sampled.rewards[0, 0, -2].item() + 0.5 * sampled.rewards[0, 0, -1].item())


def test_policy_gradient_estimate_matches_the_exact_gradient_of_a_gaussian_bandit():
    """One-step bandit, reward -(a - c)^2 summed over 2 action dims, a ~ N(mu, sigma^2):
    J = -sum((mu - c)^2 + sigma^2), dJ/dmu = -2 (mu - c), dJ/dlog_sigma = -2 sigma^2. The
    REINFORCE surrogate's gradient (the inner loss without a baseline) estimates it."""
    torch.manual_seed(0)
    learner = small_learner(torch.float64)
    n = 200_000
    obs = torch.zeros(1, n, 1, 2, dtype=torch.float64)
    params = {k: v.detach() for k, v in learner.policy.named_parameters()}
    mean, log_std = learner.policy(obs)
    actions = (mean + log_std.exp() * torch.randn_like(mean)).detach()
    c = torch.tensor([0.3, -0.4], dtype=torch.float64)
    reward = -(actions - c).square().sum(-1)
    params = {k: v.requires_grad_() for k, v in params.items()}
    loss = learner._inner_loss(params, obs[0], actions[0], reward[0], torch.ones_like(reward[0]))
    grads = torch.autograd.grad(-loss, [params["mean.4.bias"], params["log_std"]])
    mu, sigma = mean[0, 0, 0].detach(), log_std[0, 0, 0].exp().detach()
    exact_mu, exact_log_std = -2 * (mu - c), -2 * sigma ** 2
    # Monte-Carlo standard error of the estimator of each gradient entry
    score_mu = (actions[0, :, 0] - mu) / sigma ** 2 * reward[0, :, 0, None]
    error = score_mu.std(0) / math.sqrt(n)
    assert ((grads[0] - exact_mu).abs() < 4 * error).all(), (grads[0], exact_mu, error)
    assert (grads[1] - exact_log_std).abs().max() < 0.05 * exact_log_std.abs().max()


# -- conjugate gradient, Fisher-vector product, TRPO -------------------------------------------------


def test_conjugate_gradient_solves_a_symmetric_positive_definite_system():
    torch.manual_seed(0)
    a = torch.randn(8, 8, dtype=torch.float64)
    matrix = a @ a.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    x = conjugate_gradient(lambda v: matrix @ v, b, iters=8)
    torch.testing.assert_close(x, torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-10)
    assert conjugate_gradient(lambda v: matrix @ v, torch.zeros(8, dtype=torch.float64)).abs().max() == 0


def as_function_of_flat(function, theta):
    """``function(params dict)`` as a function of one flat vector of ``theta``'s shapes."""
    names, shapes, sizes = list(theta), [p.shape for p in theta.values()], [p.numel() for p in theta.values()]
    return lambda vector: function(dict(zip(names, (p.view(s) for p, s in zip(vector.split(sizes), shapes)))))


@pytest.mark.parametrize("inner_steps", [1, 0])
def test_fisher_vector_product_equals_the_explicit_hessian_of_the_mean_kl(inner_steps):
    """TRPO's curvature products (double backward through the inner step) against the explicit
    Hessian of the mean KL, and against J^T G J built independently: J the explicit Jacobian of
    the adapted policies' outputs in theta, G the Gaussian's Fisher matrix (1/std^2 for the
    mean, 2 for the log-std) with the objective's weights."""
    learner = small_learner(torch.float64, inner_steps=inner_steps, hidden=3)
    torch.manual_seed(2)
    meta = learner.meta_objective(nav_batch(3, dtype=torch.float64))
    theta = {k: v.detach() for k, v in learner.policy.named_parameters()}
    flat_theta = flat(theta.values())
    hessian = torch.autograd.functional.hessian(as_function_of_flat(lambda p: meta.objective(p)[1], theta), flat_theta)

    observations, mask = meta.evaluation.observations, meta.evaluation.mask
    outputs = as_function_of_flat(lambda p: torch.cat(learner._distribution(meta.adapted(p), True, observations), -1),
                                  theta)
    jacobian = torch.autograd.functional.jacobian(outputs, flat_theta).flatten(0, -2)  # (tasks*N*H*4, P)
    old_log_std = outputs(flat_theta)[..., 2:]
    weight = (mask / mask.sum((1, 2), keepdim=True) / mask.shape[0]).unsqueeze(-1)
    fisher_diagonal = torch.cat([weight * torch.exp(-2 * old_log_std), 2 * weight.expand_as(old_log_std)], -1)
    fisher = jacobian.T @ (fisher_diagonal.reshape(-1, 1) * jacobian)
    torch.testing.assert_close(hessian, fisher, rtol=1e-6, atol=1e-9)

    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    product = kl_hessian_vector(meta.objective(leaves)[1], list(leaves.values()))
    torch.manual_seed(3)
    for _ in range(3):
        v = torch.randn(hessian.shape[0], dtype=torch.float64)
        torch.testing.assert_close(product(v), hessian @ v, rtol=1e-7, atol=1e-10)


def test_meta_gradient_through_the_inner_step_equals_a_per_task_autograd_loop():
    """The surrogate's gradient in theta, through the VPG step (vmap + torch.func), against
    autograd.grad(create_graph=True) task by task on the same trajectories."""
    learner = small_learner(torch.float64, hidden=4)
    torch.manual_seed(5)
    meta = learner.meta_objective(nav_batch(3, dtype=torch.float64))
    theta = {k: v.detach().clone().requires_grad_() for k, v in learner.policy.named_parameters()}
    loss, _ = meta.objective(theta)
    batched = torch.autograd.grad(loss, list(theta.values()))

    from torch.func import functional_call

    (inner, inner_advantage), = meta.inner
    evaluation, advantage = meta.evaluation, meta.advantage
    total = 0.0
    for t in range(3):
        mean, log_std = functional_call(learner.policy, theta, (inner.observations[t],))
        logp = gaussian_log_prob(inner.actions[t], mean, log_std)
        mask = inner.mask[t]
        inner_loss = -(logp * inner_advantage[t] * mask).sum() / mask.sum()
        grads = torch.autograd.grad(inner_loss, list(theta.values()), create_graph=True)
        adapted = {k: p - 0.1 * g for (k, p), g in zip(theta.items(), grads)}
        mean, log_std = functional_call(learner.policy, adapted, (evaluation.observations[t],))
        ratio = torch.exp(gaussian_log_prob(evaluation.actions[t], mean, log_std) - meta.old_log_prob[t])
        mask = evaluation.mask[t]
        total = total - (ratio * advantage[t] * mask).sum() / mask.sum() / 3
    looped = torch.autograd.grad(total, list(theta.values()))
    assert abs(float(total.detach()) - float(loss.detach())) < 1e-12
    for a, b in zip(batched, looped):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_first_order_drops_the_second_derivative_of_the_inner_step():
    learner = small_learner(torch.float64, first_order=True, hidden=4)
    torch.manual_seed(5)
    meta = learner.meta_objective(nav_batch(2, dtype=torch.float64))
    theta = {k: v.detach().clone().requires_grad_() for k, v in learner.policy.named_parameters()}
    adapted = meta.adapted(theta)
    # d(adapted)/d(theta) is the identity per task: the gradient of sum(adapted) is the task count
    grads = torch.autograd.grad(sum(p.sum() for p in adapted.values()), list(theta.values()))
    assert all(torch.equal(g, torch.full_like(g, 2.0)) for g in grads)


def test_trpo_step_keeps_the_kl_within_the_bound_and_improves_the_surrogate():
    learner = small_learner(torch.float64)
    torch.manual_seed(0)
    meta = learner.meta_objective(nav_batch(4, dtype=torch.float64))
    theta = {k: v.detach().clone().requires_grad_() for k, v in learner.policy.named_parameters()}
    for max_kl in (0.01, 1e-4):
        new, info = trpo_step(meta.objective, theta, max_kl)
        with torch.no_grad():
            loss, kl = meta.objective(new)
            before, kl_before = meta.objective(theta)
        assert kl_before.item() == pytest.approx(0.0, abs=1e-12)
        assert 0 < kl.item() <= max_kl
        assert loss.item() < before.item()
        assert info["kl"] == pytest.approx(kl.item())
        # the quadratic model is good here: the step is near the bound
        assert kl.item() > 0.3 * max_kl
    # the full step is scaled to KL max_kl in the quadratic model, sqrt(2 max_kl / s'Fs) s: with a
    # small bound the model is near exact, and the first candidate lands on the bound
    new, info = trpo_step(meta.objective, theta, 1e-8)
    assert info["backtracks"] == 0 and 0.95e-8 < info["kl"] <= 1e-8


def test_the_trpo_constraint_is_the_kl_from_the_policies_that_sampled():
    """The constraint is the mean KL(old || new) of the sampling (adapted) policies' action
    distributions over the unmasked steps (rllab's and the paper's), against torch.distributions."""
    from torch import distributions as D

    learner = small_learner(torch.float64)
    torch.manual_seed(0)
    meta = learner.meta_objective(nav_batch(3, dtype=torch.float64))
    theta = {k: v.detach().clone() for k, v in learner.policy.named_parameters()}
    new = {k: v + 0.1 * torch.randn_like(v) for k, v in theta.items()}
    mask = meta.evaluation.mask
    old_mean, old_log_std = learner._distribution(meta.adapted(theta), True, meta.evaluation.observations)
    mean, log_std = learner._distribution(meta.adapted(new), True, meta.evaluation.observations)
    old, now = (D.Normal(m, s.exp().expand_as(m)) for m, s in ((old_mean, old_log_std), (mean, log_std)))
    per_step = D.kl_divergence(old, now).sum(-1)
    expected = ((per_step * mask).sum((1, 2)) / mask.sum((1, 2))).mean()
    assert meta.objective(new)[1].item() == pytest.approx(expected.item(), rel=1e-9)
    reverse = D.kl_divergence(now, old).sum(-1)
    assert abs(((reverse * mask).sum((1, 2)) / mask.sum((1, 2))).mean().item() - expected.item()) > 1e-4


def test_meta_loss_gradient_is_minus_the_trpo_step():
    learner = small_learner()
    torch.manual_seed(0)
    batch = nav_batch(3)
    before = {k: v.detach().clone() for k, v in learner.policy.named_parameters()}
    loss, metrics = learner.meta_loss(batch)
    loss.backward()
    with torch.no_grad():
        for p in learner.parameters():
            p -= p.grad
    assert metrics["kl"] <= 0.01 and set(metrics) >= {"return", "return_adapted", "env_steps_per_s"}
    moved = sum((p.detach() - before[k]).square().sum() for k, p in learner.policy.named_parameters())
    assert moved.item() == pytest.approx(2 * loss.item(), rel=1e-5)


def test_outer_gradient_returns_the_meta_objective_for_the_trainers_optimiser():
    """The gradient outer loop's loss has the importance-weighted surrogate's gradient and, as
    its value, minus the adapted policies' average return (the surrogate's own value is 0 at
    theta: ratio 1, standardised advantages), so that its logged curve is not a flat line."""
    learner = small_learner(torch.float64, outer="gradient")
    batch = nav_batch(3, dtype=torch.float64)
    params = list(learner.policy.parameters())
    loss, metrics = learner.meta_loss(batch)
    got = torch.autograd.grad(loss, params)
    meta = learner.meta_objective(batch)  # the same trajectories: each task's draws come from its seed
    surrogate, _ = meta.objective(dict(learner.policy.named_parameters()))
    expected = torch.autograd.grad(surrogate, params)
    assert abs(surrogate.item()) < 1e-12  # the surrogate's value carries nothing
    assert loss.item() == pytest.approx(-metrics["return_adapted"].item(), rel=1e-12)
    assert loss.item() == pytest.approx(-meta.evaluation.returns().mean().item(), rel=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    assert max(g.abs().max().item() for g in got) > 1e-3  # a real gradient, not zeros
    assert learner.chunking_refused() is None and small_learner().chunking_refused() is not None
    # without an inner step the objective is theta's own return
    learner = small_learner(torch.float64, outer="gradient", inner_steps=0)
    loss, metrics = learner.meta_loss(batch)
    assert loss.item() == pytest.approx(-metrics["return"].item(), rel=1e-12) and "return_adapted" not in metrics


def test_evaluation_scores_the_return_before_and_after_each_step():
    """episode_scores against a loop written out: the batch's generators (one per task, drawn on
    from one rollout to the next) roll out theta, a policy-gradient step per task by autograd at
    inner_lr, a rollout of the adapted policies, a step at inner_lr * test_lr_decay, and so on;
    the score of each row is the average undiscounted return of each task's trajectories."""
    from torch.func import functional_call

    learner = small_learner(torch.float64, test_inner_steps=3, inner_lr=0.3, test_lr_decay=0.3)
    config = learner.config
    batch = nav_batch(3, dtype=torch.float64)
    scores = learner.episode_scores(batch)
    assert scores.shape == (4, 3) and (scores < 0).all()
    assert torch.equal(learner.episode_scores(batch, per_step=False), scores[-1:])

    generators = batch.generators()
    theta = {k: v.detach() for k, v in learner.policy.named_parameters()}
    params, per_task, expected = theta, False, []
    for step, lr in enumerate([config.inner_lr, config.inner_lr * config.test_lr_decay,
                               config.inner_lr * config.test_lr_decay, None]):
        sampled = learner._rollout(batch, params, per_task, config.test_trajectories, generators)
        expected.append(sampled.rewards.sum(-1).mean(1))
        if lr is None:
            break
        advantage = advantages(sampled, config.discount)
        adapted = []
        for t in range(3):
            own = {k: (v[t] if per_task else v).clone().requires_grad_() for k, v in params.items()}
            mean, log_std = functional_call(learner.policy, own, (sampled.observations[t],))
            mask = sampled.mask[t]
            loss = -(gaussian_log_prob(sampled.actions[t], mean, log_std) * advantage[t] * mask).sum() / mask.sum()
            grads = torch.autograd.grad(loss, list(own.values()))
            adapted.append({k: (p - lr * g).detach() for (k, p), g in zip(own.items(), grads)})
        params, per_task = {k: torch.stack([a[k] for a in adapted]) for k in theta}, True
    expected = torch.stack(expected)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-9)
    # the steps move the policy well beyond rounding: the loop's adaptation is not a no-op
    assert max((params[k] - theta[k]).abs().max().item() for k in theta) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_float64_or_bfloat16_policy_takes_the_environments_float32_tasks(dtype):
    """The environments draw their tasks float32 (nav2d's goals); a policy converted with
    learner.to(dtype) meets them in its own type (meta_loss, episode_scores, evaluate), not in
    torch's "mat1 and mat2 must have the same dtype", while the environment stays float32: the
    trajectories, rewards, returns and scores are float32, the advantages, log-probabilities and
    loss of the policy's type, and so are the gradients (float64's for gradient checks)."""
    from metalearn.evaluation import evaluate

    for outer in ("trpo", "gradient"):
        learner, batch = small_learner(dtype, hidden=3, outer=outer), nav_batch(2)
        assert batch.params["goal"].dtype == torch.float32
        loss, metrics = learner.meta_loss(batch)
        loss.backward()
        assert loss.dtype == dtype and {p.grad.dtype for p in learner.parameters()} == {dtype}
        assert all(p.grad.abs().sum() > 0 for p in learner.parameters())
        assert metrics["return"].dtype == torch.float32 and metrics["return_adapted"].dtype == torch.float32
    meta = small_learner(dtype, hidden=3).meta_objective(batch)
    (inner, inner_advantage), = meta.inner
    for sampled in (inner, meta.evaluation):
        assert {sampled.observations.dtype, sampled.actions.dtype, sampled.rewards.dtype,
                sampled.mask.dtype} == {torch.float32}
    assert {inner_advantage.dtype, meta.advantage.dtype, meta.old_log_prob.dtype} == {dtype}
    scores = learner.episode_scores(batch)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert math.isfinite(evaluate(learner, MDPTasks(Nav2D()), 2, progress=False)["mean"])


def fixed_action_learner(dtype, action, observation_dim=2, action_dim=2, **options) -> MAMLRL:
    """A deterministic policy: zero weights, the last layer's bias ``action`` (exact in bfloat16),
    a log standard deviation so low that the Gaussian noise vanishes in every type."""
    config = MAMLRLConfig(**{"trajectories": 3, "test_trajectories": 3, "horizon": 12, "hidden": 4, **options})
    learner = MAMLRL(GaussianMLPPolicy(observation_dim, action_dim, config.hidden), config).to(dtype)
    with torch.no_grad():
        for p in learner.policy.parameters():
            p.zero_()
        learner.policy.mean[-1].bias.copy_(torch.tensor(action))
        learner.policy.log_std.fill_(-1000.0)
    return learner


def test_rollout_of_a_policy_of_another_type_steps_nav2d_in_float32():
    """The goals as drawn (float32), one action in the policy's type: the environment gets it
    in its own type, so that a bfloat16 or float64 policy's action, the same number, gives the
    float32 positions, rewards and returns exactly (in bfloat16 they were rounded to -77.5, ...)."""
    goals = MDPTasks(Nav2D()).sample(4, torch.Generator().manual_seed(0)).params
    action = 0.0390625  # 5/128: the same number in every type
    sampled = {dtype: rollout(Nav2D(), goals, 2, lambda obs: torch.full_like(obs, action, dtype=dtype))
               for dtype in (torch.float32, torch.bfloat16, torch.float64)}
    for dtype in (torch.bfloat16, torch.float64):
        for name in ("observations", "actions", "rewards", "mask"):
            value, expected = getattr(sampled[dtype], name), getattr(sampled[torch.float32], name)
            assert value.dtype == torch.float32 and torch.equal(value, expected), (dtype, name)
        assert torch.equal(sampled[dtype].returns(), sampled[torch.float32].returns())
        assert torch.equal(sampled[dtype].rewards_to_go(0.99), sampled[torch.float32].rewards_to_go(0.99))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_policys_type_leaves_the_environments_numbers_as_float32s(dtype):
    """With the same seed, a deterministic policy that outputs one action (the same number in
    every type) samples in bfloat16 and float64 exactly the float32 policy's trajectories: the
    same float32 observations, actions, rewards, returns and scores; the environment's
    arithmetic does not depend on the policy's type. The first task's goal lies on the path:
    its episodes end early, at the same step (the done test in float32)."""
    drawn = nav_batch(4)
    goal = drawn.params["goal"].clone()
    goal[0] = torch.tensor([0.153, -0.097])  # within 0.01 of the fourth position (0.15, -0.1) in both coordinates
    batch = MDPBatch(drawn.env, {"goal": goal}, drawn.seeds)
    action = [0.375, -0.25]  # a step of (0.0375, -0.025)
    trajectories, scores = {}, {}
    for kind in (torch.float32, dtype):
        learner = fixed_action_learner(kind, action, test_inner_steps=0, horizon=40)
        trajectories[kind], = learner.adapted_trajectories(batch, 0)
        scores[kind] = learner.episode_scores(batch)
    assert trajectories[torch.float32].mask[0].sum(-1).tolist() == [4.0] * 3  # at the goal after 4 steps
    for name in ("observations", "actions", "rewards", "mask"):
        value, expected = getattr(trajectories[dtype], name), getattr(trajectories[torch.float32], name)
        assert value.dtype == torch.float32 and torch.equal(value, expected), name
    assert torch.equal(trajectories[dtype].returns(), trajectories[torch.float32].returns())
    assert scores[dtype].dtype == torch.float32 and torch.equal(scores[dtype], scores[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_policys_type_leaves_the_half_cheetahs_numbers_as_float32s(dtype):
    """The half-cheetah as nav2d: a deterministic policy in bfloat16 or float64 gives the float32
    policy's observations, rewards and velocities exactly, all float32."""
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    from metalearn.envs.cheetah import HalfCheetah

    batch = MDPTasks(HalfCheetah("velocity")).sample(2, torch.Generator().manual_seed(0))
    action = [0.5, -0.25, 0.75, -1.5, 0.125, 1.0]
    sampled = {}
    for kind in (torch.float32, dtype):
        learner = fixed_action_learner(kind, action, observation_dim=17, action_dim=6, trajectories=2, horizon=6)
        sampled[kind] = learner._rollout(batch, dict(learner.policy.named_parameters()), False, 2)
    for name in ("observations", "actions", "rewards", "mask"):
        value, expected = getattr(sampled[dtype], name), getattr(sampled[torch.float32], name)
        assert value.dtype == torch.float32 and torch.equal(value, expected), name
    velocity = sampled[dtype].info["velocity"]
    assert velocity.dtype == torch.float32 and torch.equal(velocity, sampled[torch.float32].info["velocity"])


# -- training through the library's trainer -----------------------------------------------------------

FAST = ["--meta-batch-size", 4, "--trajectories", 4, "--test-trajectories", 4, "--horizon", 10, "--hidden", 8,
        "--eval-episodes", 4, "--checkpoint-every", 2, "--no-progress"]


def test_resume_continues_bit_exactly(tmp_path, capsys):
    code, out, err = run(["train", "maml-rl", "--steps", 4, "--run-dir", tmp_path / "whole", "--no-eval", *FAST], capsys)
    assert code == 0, err
    code, _, err = run(["train", "maml-rl", "--steps", 2, "--run-dir", tmp_path / "split", "--no-eval", *FAST], capsys)
    assert code == 0, err
    code, _, err = run(["train", "maml-rl", "--steps", 4, "--run-dir", tmp_path / "split", "--resume", "--no-eval",
                        *FAST], capsys)
    assert code == 0, err
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["learner"]
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["learner"]
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    strip = lambda records: [{k: v for k, v in r.items() if k in ("return", "return_adapted", "kl", "loss")}
                             for r in records]
    assert strip(read("whole")) == strip(read("split"))


def test_eval_writes_returns_after_0_to_3_steps_with_a_confidence_interval(tmp_path, capsys):
    code, out, err = run(["train", "maml-rl", "--steps", 1, "--run-dir", tmp_path / "run", "--no-eval", *FAST], capsys)
    assert code == 0, err
    code, out, err = run(["eval", tmp_path / "run", "--no-progress"], capsys)
    assert code == 0, err
    assert "average return" in out and "after 0..3 policy-gradient steps" in out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["metric"] == "return" and len(result["per_step"]) == 4 and result["episodes"] == 4
    assert result["ci95"] > 0 and len(result["per_step_ci95"]) == 4
    # what does not apply to an environment is refused in one line
    shutil.copytree(tmp_path / "run", tmp_path / "other")
    for args in (["eval", tmp_path / "run", "--shots", 5], ["compare", tmp_path / "run", tmp_path / "other"]):
        code, _, err = run(args, capsys)
        assert code != 0 and "reinforcement-learning" in err and err.strip().count("\n") == 0
    code, out, err = run(["plot", tmp_path / "run"], capsys)
    assert code == 0, err
    for name in ("learning_curves.png", "returns_per_step.png", "trajectories.png"):
        assert (tmp_path / "run" / "plots" / name).stat().st_size > 0
    # the random row is the run's initial weights, kept with the run: what a run of 0 steps scores
    initial = tmp_path / "run" / "eval-weights=initial.json"
    stored = json.loads(initial.read_text())
    code, _, err = run(["train", "maml-rl", "--steps", 0, "--run-dir", tmp_path / "random", *FAST], capsys)
    assert code == 0, err
    baseline = json.loads((tmp_path / "random" / "eval.json").read_text())
    assert stored["weights"] == "initial" and stored["per_step"] == baseline["per_step"]
    # a second plot reads it instead of evaluating again, and export keeps it in the summary
    initial.write_text(json.dumps({**stored, "per_step": [-1.0, -2.0, -3.0, -4.0]}))
    code, _, err = run(["plot", tmp_path / "run"], capsys)
    assert code == 0, err
    assert json.loads(initial.read_text())["per_step"] == [-1.0, -2.0, -3.0, -4.0]
    # ... also one written before a task option existed (it took the default then), and before
    # episode_seed did (its seed was the generator's)
    assert (stored["seed"], stored["episode_seed"]) == (0, TEST_SEED_OFFSET)
    older = {**stored["settings"], "task": {k: v for k, v in stored["settings"]["task"].items() if k != "augment"}}
    before = {k: v for k, v in stored.items() if k != "episode_seed"}
    initial.write_text(json.dumps({**before, "seed": TEST_SEED_OFFSET, "settings": older,
                                   "per_step": [-1.0, -2.0, -3.0, -4.0]}))
    assert run(["plot", tmp_path / "run"], capsys)[0] == 0
    assert json.loads(initial.read_text())["per_step"] == [-1.0, -2.0, -3.0, -4.0]
    # ... unless it was evaluated under other settings (a resume that changed them): then anew
    other = {**stored["settings"], "method_config": {**stored["settings"]["method_config"], "horizon": 11}}
    initial.write_text(json.dumps({**stored, "settings": other, "per_step": [-1.0, -2.0, -3.0, -4.0]}))
    code, _, err = run(["plot", tmp_path / "run"], capsys)
    assert code == 0, err
    assert json.loads(initial.read_text())["per_step"] == baseline["per_step"]
    # export evaluates it where no plot did and keeps it in the summary
    initial.unlink()
    code, _, err = run(["export", tmp_path / "run", tmp_path / "record"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "record" / "summary.json").read_text())
    assert summary["evaluations"]["eval-weights=initial"]["per_step"] == baseline["per_step"]


def test_plot_draws_every_step_even_after_a_final_only_evaluation(tmp_path, capsys, monkeypatch):
    """eval --final-only writes eval.json with the last step's return alone; plot must not take
    it for the per-step curve (it would draw the return after three steps at step 0)."""
    import metalearn.plotting_rl as plotting_rl
    from metalearn.api import plot_run

    code, _, err = run(["train", "maml-rl", "--steps", 1, "--run-dir", tmp_path / "run", "--no-eval", *FAST], capsys)
    assert code == 0, err
    code, _, err = run(["eval", tmp_path / "run", "--final-only", "--no-progress"], capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "run" / "eval.json").read_text())["per_step"]) == 1
    drawn = {}
    monkeypatch.setattr(plotting_rl, "plot_adaptation_curves",
                        lambda curves, path, *args, **kwargs: drawn.update(curves) or path)
    plot_run(tmp_path / "run")
    assert len(drawn["MAML"]["per_step"]) == 4 and len(drawn["random"]["per_step"]) == 4


def test_plot_draws_the_papers_returns_only_for_a_run_scored_as_the_paper_scored(tmp_path, capsys, monkeypatch):
    """The paper's returns are those of its step sizes, horizon, discount and trajectories per step:
    beside a run scored with another --inner-lr, --test-lr-decay, --horizon, --discount or
    --test-trajectories they would compare unlike things. Each line's label gives the step size
    the authors' evaluation adapted that policy with (nav2d's: 0.5)."""
    import metalearn.plotting_rl as plotting_rl
    from metalearn.api import plot_run
    from metalearn.plotting_rl import PAPER_RETURNS

    papers = []
    monkeypatch.setattr(plotting_rl, "plot_adaptation_curves",
                        lambda curves, path, title, paper, *args, **kwargs: papers.append(paper) or path)
    monkeypatch.setattr(plotting_rl, "plot_navigation", lambda *args, **kwargs: args[3])
    small = list(FAST)
    for option in ("--horizon", "--test-trajectories"):  # the paper's, not FAST's
        del small[small.index(option):small.index(option) + 2]
    for name, changed in (("paper", []), ("inner-lr", ["--inner-lr", 0.05]), ("decay", ["--test-lr-decay", 1.0]),
                          ("horizon", ["--horizon", 20]), ("discount", ["--discount", 0.9]),
                          ("trajectories", ["--test-trajectories", 4])):
        code, _, err = run(["train", "maml-rl", "--steps", 1, "--run-dir", tmp_path / name, "--no-eval", *small,
                            *changed], capsys)
        assert code == 0, err
        plot_run(tmp_path / name)
    assert papers[0] == {f"paper: {name}, step size 0.5": (name, PAPER_RETURNS["nav2d"][name])
                         for name in ("MAML", "random")}
    assert papers[1:] == [{}, {}, {}, {}, {}]


def test_paper_lines_name_the_authors_step_sizes_and_accept_their_trajectory_count():
    """The half-cheetahs' baselines were adapted by the authors at step sizes of their own
    (cheetah-vel: pretrained 0.02; cheetah-dir: pretrained 0.2, random 1.0): the labels say so. A
    run scored with the authors' own 20 trajectories per step gets the lines as one with the
    default 40 does; nav2d's pretrained row, whose step size is not known, is labelled without one."""
    from metalearn.options import option_defaults
    from metalearn.plotting_rl import PAPER_RETURNS, paper_references

    defaults = option_defaults(MAMLRLConfig)
    drawn = ("MAML", "pretrained", "random")
    assert list(paper_references("cheetah-dir", drawn, defaults, defaults)) == [
        "paper: MAML, step size 0.1", "paper: pretrained, step size 0.2", "paper: random, step size 1"]
    lines = paper_references("cheetah-vel", drawn, {**defaults, "test_trajectories": 20}, defaults)
    assert lines == {"paper: MAML, step size 0.1": ("MAML", PAPER_RETURNS["cheetah-vel"]["MAML"]),
                     "paper: pretrained, step size 0.02": ("pretrained", PAPER_RETURNS["cheetah-vel"]["pretrained"]),
                     "paper: random, step size 0.1": ("random", PAPER_RETURNS["cheetah-vel"]["random"])}
    assert paper_references("cheetah-vel", drawn, {**defaults, "test_trajectories": 10}, defaults) == {}
    assert "paper: pretrained" in paper_references("nav2d", drawn, defaults, defaults)
    assert paper_references("walk-to-goal", drawn, defaults, defaults) == {}


def test_a_paper_line_takes_the_colour_of_its_policys_curve(tmp_path, monkeypatch):
    """Each paper line is drawn in the colour of the curve of the policy it belongs to, whatever
    its label says; a policy without a style of its own is grey."""
    import matplotlib.colors

    import metalearn.plotting_rl as plotting_rl
    from metalearn.plotting_rl import STYLES, plot_adaptation_curves

    figures = []
    monkeypatch.setattr(plotting_rl, "save_figure", lambda fig, path: figures.append(fig) or path)
    curve = {"per_step": [1.0, 2.0], "per_step_ci95": [0.1, 0.1]}
    plot_adaptation_curves({"MAML": curve, "random": curve}, tmp_path / "returns.png", "",
                           {"the authors' MAML": ("MAML", [0.5, 1.5]), "theirs": ("random", [0.0, 0.5]),
                            "other": ("oracle", [3.0, 3.0])})
    colours = {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in figures[0].axes[0].lines}
    assert colours["the authors' MAML"] == matplotlib.colors.to_hex(STYLES["MAML"][0])
    assert colours["theirs"] == matplotlib.colors.to_hex(STYLES["random"][0])
    assert colours["other"] == matplotlib.colors.to_hex("grey")


@pytest.mark.parametrize("outer, title", [("trpo", "TRPO step, |step|^2 / 2 (meta-batch)"),
                                          ("gradient", "minus the meta-objective: -return after adapting "
                                                       "(meta-batch)")],
                         ids=["trpo", "gradient"])
def test_plot_titles_the_loss_panel_with_what_the_loss_is(outer, title, tmp_path, capsys, monkeypatch):
    """maml-rl's logged loss is not a training loss: with the TRPO step it is |step|^2 / 2, with
    the gradient outer step minus the adapted policies' return; the learning curves' panel says
    which."""
    import metalearn.plotting as plotting

    assert MAMLRL.series_labels({"outer": outer}) == {"loss": title}
    code, _, err = run(["train", "maml-rl", "--steps", 1, "--outer", outer, "--run-dir", tmp_path / "run", "--no-eval",
                        *FAST], capsys)
    assert code == 0, err
    if outer == "gradient":  # the logged loss is minus the return after adapting, not the surrogate's 0
        record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["loss"] == pytest.approx(-record["return_adapted"]) and record["loss"] != 0
    panels = {}
    save_figure = plotting.save_figure

    def capture(fig, path, *args, **kwargs):
        panels[Path(path).name] = [ax.get_title() for ax in fig.axes]
        return save_figure(fig, path, *args, **kwargs)

    monkeypatch.setattr(plotting, "save_figure", capture)
    code, _, err = run(["plot", tmp_path / "run"], capsys)
    assert code == 0, err
    drawn = panels["learning_curves.png"]
    assert title in drawn and "training loss (meta-batch)" not in drawn
    # the other panels keep their common titles
    assert "average return before adapting (meta-batch)" in drawn


def test_meta_training_improves_the_return_after_one_step():
    """A short meta-training on nav2d (8 TRPO steps of 10 tasks) raises the average return
    after one policy-gradient step on held-out goals, well beyond its standard error."""
    from metalearn.evaluation import evaluate

    torch.manual_seed(0)
    config = MAMLRLConfig(trajectories=10, test_trajectories=10, horizon=30, hidden=32, test_inner_steps=1)
    learner = MAMLRL(GaussianMLPPolicy(2, 2, 32), config)
    source = MDPTasks(Nav2D())
    before = evaluate(learner, source, 40, seed=123)
    optimizer = torch.optim.SGD(learner.parameters(), lr=1.0)  # the TRPO step, as the trainer takes it
    for step in range(8):
        batch = source.sample(10, torch.Generator().manual_seed(step))
        torch.manual_seed(step)
        optimizer.zero_grad()
        loss, _ = learner.meta_loss(batch)
        loss.backward()
        optimizer.step()
    after = evaluate(learner, source, 40, seed=123)
    gain = after["per_step"][1] - before["per_step"][1]
    assert gain > 3 * (before["ci95"] + after["ci95"]) / 1.96, (before["per_step"], after["per_step"])


def test_meta_learning_adapts_better_than_pretraining_on_all_tasks():
    """The paper's Figure 5 in small: at the same budget (8 TRPO steps of 10 nav2d tasks), the
    policy meta-trained through one policy-gradient step scores a higher return after that step
    on held-out goals than one pretrained on all tasks jointly (inner_steps 0) and then given the
    same step, and it gains more from the step, both well beyond their standard errors."""
    from metalearn.evaluation import evaluate

    def trained(inner_steps: int) -> dict:
        torch.manual_seed(0)
        config = MAMLRLConfig(trajectories=10, test_trajectories=10, horizon=30, hidden=32, test_inner_steps=1,
                              inner_steps=inner_steps)
        learner = MAMLRL(GaussianMLPPolicy(2, 2, 32), config)
        source = MDPTasks(Nav2D())
        optimizer = torch.optim.SGD(learner.parameters(), lr=1.0)
        for step in range(8):
            batch = source.sample(10, torch.Generator().manual_seed(step))
            torch.manual_seed(step)
            optimizer.zero_grad()
            learner.meta_loss(batch)[0].backward()
            optimizer.step()
        return evaluate(learner, source, 40, seed=123)

    maml, pretrained = trained(1), trained(0)
    error = (maml["ci95"] + pretrained["ci95"]) / 1.96
    assert maml["per_step"][1] - pretrained["per_step"][1] > 3 * error, (maml["per_step"], pretrained["per_step"])
    gains = [result["per_step"][1] - result["per_step"][0] for result in (maml, pretrained)]
    assert gains[0] > gains[1] + error, gains


# -- errors --------------------------------------------------------------------------------------------


def test_unknown_environment_is_one_line(capsys):
    code, out, err = run(["train", "maml-rl", "--env", "moon-lander", "--print-config"], capsys)
    assert code != 0 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "nav2d" in err and "moon-lander" in err


def test_first_order_without_inner_steps_is_refused_naming_both_options(tmp_path, capsys):
    """First order drops the second derivatives of the inner steps: with none (``inner_steps``
    0, one policy trained on all tasks) it would silently change nothing."""
    from metalearn.api import resolve_config
    from metalearn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^MAMLRL.Config.first_order drops the second derivatives of the inner "
                                          r"steps: it needs MAMLRL.Config.inner_steps of at least 1, got 0") as caught:
        MAMLRLConfig(inner_steps=0, first_order=True)
    assert caught.value.field == "first_order"
    with pytest.raises(ConfigError, match="first_order .*inner_steps"):
        resolve_config("maml-rl", {"dataset": "nav2d"}, {"inner_steps": 0, "first_order": True})
    MAMLRLConfig(inner_steps=0)  # the pretrained baseline
    MAMLRLConfig(inner_steps=1, first_order=True)
    code, out, err = run(["train", "maml-rl", "--inner-steps", 0, "--first-order", "--steps", 1,
                          "--run-dir", tmp_path / "run", "--no-eval", *FAST], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: --first-order drops the second derivatives of the inner steps: it needs "
                          "--inner-steps of at least 1, got 0"), err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_inner_steps_are_bounded_as_maml_s(capsys):
    """MAML's bound on the inner steps (a mistyped 10**8 would run for days without a word)."""
    from metalearn.algorithms.inner_loop import MAX_INNER_STEPS
    from metalearn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^MAMLRL.Config.test_inner_steps must be at most 100000 \(each step a "
                                          r"policy-gradient step on sampled trajectories\), got 100000000$"):
        MAMLRLConfig(test_inner_steps=10**8)
    MAMLRLConfig(inner_steps=MAX_INNER_STEPS, test_inner_steps=MAX_INNER_STEPS)
    code, out, err = run(["train", "maml-rl", "--inner-steps", MAX_INNER_STEPS + 1, "--print-config"], capsys)
    assert (code, out, err) == (2, "", "error: --inner-steps must be at most 100000 (each step a policy-gradient "
                                       "step on sampled trajectories), got 100001\n")


def test_supervised_method_on_an_environment_and_back_are_refused(capsys):
    code, _, err = run(["train", "maml", "--env", "nav2d", "--print-config"], capsys)
    assert code != 0 and "maml-rl" in err and err.strip().count("\n") == 0
    code, _, err = run(["train", "maml-rl", "--dataset", "sinusoid", "--print-config"], capsys)
    assert code != 0 and "nav2d" in err and err.strip().count("\n") == 0


def test_missing_rl_extra_names_the_install_command(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import gymnasium now fails
    code, _, err = run(["train", "maml-rl", "--env", "cheetah-vel", "--print-config"], capsys)
    assert code != 0 and "Traceback" not in err
    assert 'pip install -e ".[rl]"' in err and err.strip().count("\n") == 0


# -- half-cheetah (the rl extra; skipped without it) --------------------------------------------------


def test_cheetah_rewards_follow_the_paper_from_the_simulator_velocity():
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    from metalearn.envs.cheetah import HalfCheetah

    for goal, params in (("velocity", {"velocity": torch.tensor([0.5, 1.5])}),
                         ("direction", {"direction": torch.tensor([1.0, -1.0])})):
        env = HalfCheetah(goal)
        torch.manual_seed(0)
        state, obs = env.reset(params, 2)
        assert obs.shape == (2, 2, 17)
        action = torch.randn(2, 2, 6) * 1.5
        positions = [e.unwrapped.data.qpos[0] for e in state["envs"]]
        state, obs, reward, done = env.step(state, action)
        dt = state["envs"][0].unwrapped.dt
        velocity = torch.tensor([(e.unwrapped.data.qpos[0] - x) / dt for e, x in zip(state["envs"], positions)],
                                dtype=torch.float32).view(2, 2)
        target = params[goal][:, None]
        progress = -(velocity - target).abs() if goal == "velocity" else target * velocity
        expected = progress - 0.05 * action.clamp(-1, 1).square().sum(-1)
        torch.testing.assert_close(reward, expected, rtol=1e-5, atol=1e-5)
        assert not done.any()


def test_cheetah_keeps_a_nan_action_from_mujoco(tmp_path, monkeypatch, capfd):
    """A diverged policy's NaN action would make MuJoCo warn on stderr and write MUJOCO_LOG.TXT into
    the working directory: its simulator is driven by 0 instead, and its reward is NaN (the
    divergence shows in the return); the other environments step as ever, infinite actions
    clipped to the bound."""
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    from metalearn.envs.cheetah import HalfCheetah

    monkeypatch.chdir(tmp_path)
    env = HalfCheetah("velocity")
    params = {"velocity": torch.tensor([0.5, 1.5])}
    action = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(0))
    action[0, 1, 2] = float("nan")
    action[1, 0, 0] = float("inf")
    state, _ = env.reset(params, 2, torch.arange(4).view(2, 2))
    capfd.readouterr()
    state, obs, reward, _ = env.step(state, action)
    out, err = capfd.readouterr()
    assert not list(tmp_path.iterdir()) and "WARNING" not in out + err
    assert torch.isnan(reward[0, 1]) and torch.isfinite(reward.flatten()[[0, 2, 3]]).all()
    assert torch.isfinite(obs).all()
    # the others as if stepped alone: the NaN row is driven by 0, the infinite one by the bound
    expected_action = action.clone()
    expected_action[0, 1, 2] = 0.0
    state, _ = env.reset(params, 2, torch.arange(4).view(2, 2))
    state, expected_obs, expected_reward, _ = env.step(state, expected_action)
    torch.testing.assert_close(obs, expected_obs, rtol=0, atol=0)
    keep = torch.tensor([[True, False], [True, True]])
    torch.testing.assert_close(reward[keep], expected_reward[keep], rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 3])
def test_cheetah_steps_as_gymnasium_does_to_the_bit(threads, monkeypatch):
    """The half-cheetahs step MuJoCo themselves, without gymnasium's step around it, split among
    torch's threads: the same observations and velocities (hence rewards) as gymnasium's
    ``HalfCheetah-v5.step``, exactly, over a whole episode of random actions (some beyond the
    action bounds), with one thread and with three (two environments each)."""
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    import numpy as np

    from metalearn.envs import cheetah

    monkeypatch.setattr(cheetah.HalfCheetah, "envs_per_thread", 2)
    pool, sizes = cheetah.ThreadPoolExecutor(3), []
    monkeypatch.setattr(cheetah, "_threads", lambda count: sizes.append(count) or pool)
    env, reference = cheetah.HalfCheetah("direction"), cheetah.HalfCheetah("direction")
    # float64 task parameters: the environment computes in their type, which holds gymnasium's numbers exactly
    params = {"direction": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    seeds = torch.tensor([[3, 4, 5], [6, 7, 8]])
    state, obs = env.reset(params, 3, seeds)
    twins = reference.reset(params, 3, seeds)[0]["envs"]
    generator = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(env.horizon):
            action = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64) * 1.5
            state, obs, reward, _ = env.step(state, action)
            expected_obs, expected_velocity = [], []
            for twin, a in zip(twins, action.clamp(-1, 1).reshape(6, 6).numpy()):
                observation, _, _, _, info = twin.step(a)
                expected_obs.append(observation)
                expected_velocity.append(info["x_velocity"])
            assert torch.equal(obs.reshape(6, 17), torch.as_tensor(np.stack(expected_obs)))
            # forward_velocity_index: the root's x velocity qvel[0] at the end of the step
            assert obs.reshape(6, 17)[:, cheetah.HalfCheetah.forward_velocity_index].tolist() == \
                [twin.data.qvel[0] for twin in twins]
            velocity = torch.tensor(expected_velocity, dtype=torch.float64).view(2, 3)
            control = 0.05 * action.clamp(-1, 1).square().sum(-1)
            assert torch.equal(reward, params["direction"][:, None].double() * velocity - control)
    finally:
        torch.set_num_threads(before)
        pool.shutdown()
    assert set(sizes) == ({3} if threads == 3 else set())


@pytest.mark.parametrize("goal", ["velocity", "direction"])
def test_velocity_plot_draws_the_velocity_the_reward_saw(goal, tmp_path, monkeypatch):
    """velocities.png draws, for each step, the velocity v of that step's reward (the root's x
    displacement over the step over its duration): the reward plus the control cost is -|v - g|
    (cheetah-vel) or d v (cheetah-dir) for the plotted v, before and after the step. The
    observation's qvel[0], the velocity at the end of the step before, is not it."""
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    import metalearn.plotting_rl as plotting_rl
    from metalearn import Problem
    from metalearn.envs.cheetah import HalfCheetah
    from metalearn.plotting_rl import plot_velocities

    env = HalfCheetah(goal)
    torch.manual_seed(0)
    learner = MAMLRL.build(MAMLRLConfig(test_trajectories=3, horizon=12, hidden=8), Problem((17,), 6, False))
    batch = MDPTasks(env).sample(2, torch.Generator().manual_seed(1))
    before, after = learner.adapted_trajectories(batch, steps=1)
    drawn = []
    monkeypatch.setattr(plotting_rl, "save_figure", lambda fig, path, *args, **kwargs: drawn.append(fig) or path)
    plot_velocities(before, after, batch.params, env.forward_velocity_info, tmp_path / "velocities.png", shown=3)
    target = batch.params[goal]
    for t, ax in enumerate(drawn[0].axes):
        lines = [torch.tensor(line.get_ydata(), dtype=torch.float32) for line in ax.get_lines()]
        # per policy: 3 trajectories, then their mean; the goal's line last
        for k, sampled in enumerate((before, after)):
            plotted = torch.stack(lines[4 * k:4 * k + 3])  # (trajectories, H)
            progress = sampled.rewards[t] + 0.05 * sampled.actions[t].clamp(-1, 1).square().sum(-1)
            expected = -(plotted - target[t]).abs() if goal == "velocity" else target[t] * plotted
            torch.testing.assert_close(progress, expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(plotted, sampled.observations[t, :, :, HalfCheetah.forward_velocity_index],
                                      atol=1e-3)
    assert before.info["velocity"].shape == before.rewards.shape  # (tasks, trajectories, H)


def _step_cheetah_twice(env) -> None:
    params = {"direction": torch.tensor([1.0, -1.0])}
    state, _ = env.reset(params, 2, torch.tensor([[1, 2], [3, 4]]))
    env.step(state, torch.zeros(2, 2, 6))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_process_steps_the_cheetahs_on_threads_of_its_own(monkeypatch):
    """The stepping threads of a process do not exist in a child it forks; the child makes its
    own instead of queueing work for threads that will never run it (it would hang)."""
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    import multiprocessing

    from metalearn.envs import cheetah

    monkeypatch.setattr(cheetah.HalfCheetah, "envs_per_thread", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        env = cheetah.HalfCheetah("direction")
        _step_cheetah_twice(env)  # the pool of 2 threads exists now
        child = multiprocessing.get_context("fork").Process(target=_step_cheetah_twice, args=(env,))
        child.start()
        child.join(60)
        if child.exitcode is None:
            child.kill()
        assert child.exitcode == 0
    finally:
        torch.set_num_threads(before)


def test_cheetah_meta_step_runs_through_the_trainer(tmp_path, capsys):
    pytest.importorskip("mujoco")
    pytest.importorskip("gymnasium")
    code, out, err = run(["train", "maml-rl", "--env", "cheetah-dir", "--steps", 1, "--run-dir", tmp_path / "run",
                          *FAST], capsys)
    assert code == 0, err
    assert "average return" in out
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kl"] <= 0.01 and math.isfinite(record["return_adapted"])
    code, _, err = run(["plot", tmp_path / "run"], capsys)
    assert code == 0, err
    for name in ("learning_curves.png", "returns_per_step.png", "velocities.png"):
        assert (tmp_path / "run" / "plots" / name).stat().st_size > 0


def test_ensemble_eval_of_a_policy_run_is_refused_in_one_line(tmp_path, capsys):
    """--ensemble averages the predictions of the best checkpoints; maml-rl scores returns, which
    do not average that way: an error line (exit 2), no traceback, and no evaluation written. So
    training refuses --keep-best, which keeps checkpoints for it, in one line, before writing."""
    code, _, err = run(["train", "maml-rl", "--steps", 2, "--run-dir", tmp_path / "kept", "--no-eval", "--val-every", 1,
                        "--val-episodes", 4, "--keep-best", 2, *FAST], capsys)
    assert code == 2 and "Traceback" not in err and err.startswith("error: ") and err.strip().count("\n") == 0
    assert "--keep-best does not apply to maml-rl" in err and "--ensemble" in err
    assert not (tmp_path / "kept").exists() or not any((tmp_path / "kept").iterdir())
    code, _, err = run(["train", "maml-rl", "--steps", 2, "--run-dir", tmp_path / "run", "--no-eval", "--val-every", 1,
                        "--val-episodes", 4, *FAST], capsys)
    assert code == 0, err
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    code, out, err = run(["eval", tmp_path / "run", "--ensemble", "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and err.strip().count("\n") == 0
    assert "maml-rl scores its episodes otherwise" in err  # the method, not its missing best/
    # the library refuses the method itself, whatever checkpoints the run holds
    from metalearn.api import evaluate_run
    from metalearn.errors import MetalearnError

    with pytest.raises(MetalearnError) as refused:
        evaluate_run(tmp_path / "run", ensemble=True, progress=False)
    message = str(refused.value)
    assert message.startswith("ensemble=True averages") and "maml-rl" in message and "without ensemble=True" in message
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    assert not list((tmp_path / "run").glob("eval*"))


def test_a_non_finite_trpo_meta_objective_stops_training_in_one_line(tmp_path, capsys):
    """An inner step of 1e30 makes the meta-objective non-finite. The TRPO line search then takes
    no step, which must not pass for a loss of 0 and a run that trains on: the trainer stops at
    step 1 (exit 2, one line), keeping the checkpoint of step 0 and logging no step, only the
    record of its divergence."""
    code, out, err = run(["train", "maml-rl", "--steps", 3, "--inner-lr", "1e30", "--run-dir", tmp_path / "run",
                          "--no-eval", *FAST], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and err.strip().count("\n") == 0
    assert "the meta-loss became nan at step 1" in err
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 0
    assert all(torch.isfinite(v).all() for v in state["learner"].values())
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == [
        {"step": 1, "diverged": "the meta-loss became nan"}]


def test_task_chunk_is_refused_in_one_line(capsys):
    code, _, err = run(["train", "maml-rl", "--task-chunk", 2, "--print-config"], capsys)
    assert code != 0 and "TRPO step" in err and "torchrun" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("options, named", [
    (["--meta-optimizer", "adam"], "--meta-optimizer"),
    (["--meta-lr", "0.5"], "--meta-lr"),
    (["--grad-clip", "1"], "--grad-clip"),
    (["--lr-anneal", "linear"], "--lr-anneal"),
    (["--lr-anneal", "cosine"], "--lr-anneal"),
    (["--lr-halve-every", "2"], "--lr-halve-every"),
    (["--meta-optimizer", "adam", "--meta-lr", "1e-3"], "--meta-optimizer, --meta-lr"),
], ids=["adam", "meta-lr", "grad-clip", "linear", "cosine", "halve", "adam-and-rate"])
def test_trpo_refuses_trainer_options_that_change_its_step(options, named, tmp_path, capsys):
    """The trainer's SGD at rate 1 takes exactly the TRPO step; another optimiser, rate, clipping
    or schedule would change the step while the metrics log TRPO's KL (Adam makes every later
    line search fail). Refused in one line naming --outer gradient, before anything is written;
    --outer gradient takes them, and TRPO's own values given explicitly are accepted."""
    code, _, err = run(["train", "maml-rl", *options, "--steps", 1, "--run-dir", tmp_path / "run", *FAST], capsys)
    assert code == 2 and "Traceback" not in err and err.startswith("error: ") and err.strip().count("\n") == 0
    assert err.startswith(f"error: {named} would change the TRPO meta-update") and "--outer gradient" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    code, _, err = run(["train", "maml-rl", *options, "--outer", "gradient", "--print-config", *FAST], capsys)
    assert code == 0, err
    code, _, err = run(["train", "maml-rl", "--meta-optimizer", "sgd", "--meta-lr", "1", "--outer", "trpo",
                        "--print-config", *FAST], capsys)
    assert code == 0, err


def test_trpo_refusal_names_each_field_with_its_owner_in_the_library():
    """From Python the message names the trainer's field and MAML-RL's own with their configs."""
    from metalearn.api import resolve_config
    from metalearn.errors import ConfigError
    from metalearn.training import build_trainer

    with pytest.raises(ConfigError) as caught:
        build_trainer(resolve_config("maml-rl", {"dataset": "nav2d"}, {}, {"meta_lr": 0.5}))
    assert str(caught.value).startswith("TrainConfig.meta_lr would change the TRPO meta-update of "
                                        "MAMLRL.Config.outer trpo")
    assert "give MAMLRL.Config.outer gradient" in str(caught.value)
    assert "TrainConfig.outer" not in str(caught.value)


def test_outer_gradient_defaults_to_the_authors_first_order_adam():
    """TRPO's defaults (SGD at rate 1) would take the raw meta-gradient as the step; the gradient
    outer loop takes Adam at 1e-3 (the authors' MAMLVPG), where the user names none."""
    from metalearn.api import resolve_config

    for env in ("nav2d", "cheetah-vel"):
        task = resolve_config("maml-rl", {"dataset": env}).task
        _, trpo = MAMLRL.paper_defaults(task, {})
        _, gradient = MAMLRL.paper_defaults(task, {"outer": "gradient"})
        assert (trpo["meta_optimizer"], trpo["meta_lr"]) == ("sgd", 1.0)
        assert (gradient["meta_optimizer"], gradient["meta_lr"]) == ("adam", 1e-3)
        assert {k: v for k, v in gradient.items() if k not in ("meta_optimizer", "meta_lr")} == \
            {k: v for k, v in trpo.items() if k not in ("meta_optimizer", "meta_lr")}


def test_outer_gradient_resolves_to_adam_unless_given():
    from metalearn.api import resolve_config

    config = resolve_config("maml-rl", {"dataset": "nav2d"}, {"outer": "gradient"})
    assert (config.train.meta_optimizer, config.train.meta_lr) == ("adam", 1e-3)
    config = resolve_config("maml-rl", {"dataset": "nav2d"}, {"outer": "gradient"}, {"meta_lr": 3e-4})
    assert (config.train.meta_optimizer, config.train.meta_lr) == ("adam", 3e-4)
    config = resolve_config("maml-rl", {"dataset": "nav2d"})
    assert (config.train.meta_optimizer, config.train.meta_lr) == ("sgd", 1.0)


def test_an_evaluation_of_one_episode_has_no_spread_and_no_warning():
    """One episode has no standard deviation: its intervals are 0, without torch's warning of
    std() with no degrees of freedom."""
    import warnings

    from metalearn.evaluation import evaluate

    learner = small_learner(test_inner_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate(learner, MDPTasks(Nav2D()), 1, seed=3)
    assert result["episodes"] == 1 and result["ci95"] == 0.0 and result["per_step_ci95"] == [0.0, 0.0, 0.0]
    assert len(result["per_step"]) == 3 and all(math.isfinite(v) for v in result["per_step"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two = evaluate(learner, MDPTasks(Nav2D()), 2, seed=3)
    assert two["ci95"] > 0 and all(v > 0 for v in two["per_step_ci95"])


def test_a_tasks_rollouts_do_not_depend_on_the_other_tasks_of_its_batch():
    """Each task draws from its own seed: a task alone (a torchrun rank's share) gets the
    trajectories it gets within the whole batch, and the adapted policy's ones as well."""
    learner = small_learner()
    batch = nav_batch(5, seed=4)
    whole = learner.adapted_trajectories(batch, 1)
    part = learner.adapted_trajectories(batch.select(slice(3, 5)), 1)
    for a, b in zip(whole, part):
        torch.testing.assert_close(a.actions[3:], b.actions, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.rewards[3:], b.rewards, rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole[0].actions[0], whole[0].actions[1])  # tasks draw differently


def test_init_from_copies_the_policy_of_another_run(tmp_path, capsys):
    """--init-from copies the network; a maml-rl learner keeps it as ``policy``, so the copy is of
    the source run's policy (it copied nothing, silently); another network is one line."""
    from metalearn.runs import RunDir

    assert run(["train", "maml-rl", "--steps", 1, "--run-dir", tmp_path / "source", "--no-eval", *FAST], capsys)[0] == 0
    code, _, err = run(["train", "maml-rl", "--steps", 0, "--seed", 5, "--init-from", tmp_path / "source", "--run-dir",
                        tmp_path / "copy", "--no-eval", *FAST], capsys)
    assert code == 0, err
    source, copy = (RunDir(tmp_path / name).read_checkpoint("learner")["learner"] for name in ("source", "copy"))
    policy = [name for name in source if name.startswith("policy.")]
    assert policy and all(torch.equal(source[name], copy[name]) for name in policy)
    wider = [*FAST[:FAST.index("--hidden")], "--hidden", 16, *FAST[FAST.index("--hidden") + 2:]]
    code, _, err = run(["train", "maml-rl", "--steps", 0, "--init-from", tmp_path / "source", "--run-dir",
                        tmp_path / "wider", "--no-eval", *wider], capsys)
    assert code == 2 and "its network differs from this one" in err


def test_every_option_either_trains_scores_or_shapes_the_policy():
    """An option that acts at evaluation changes the returns a run is scored by: it must be one of
    the options that plot --compare checks (a new option would otherwise pass unchecked)."""
    import dataclasses

    acting_at_test = {f.name for f in dataclasses.fields(MAMLRL.Config) if not f.metadata.get("training_only")}
    assert acting_at_test - {"hidden"} == set(MAMLRL.scored_options)


def test_plot_compare_refuses_a_run_scored_otherwise_before_writing(tmp_path, capsys):
    """Returns of another horizon (or number of test trajectories, test steps, ...) do not share
    the figure's axis: refused in one line, before any figure of the run is written."""
    assert run(["train", "maml-rl", "--steps", 1, "--run-dir", tmp_path / "a", "--no-eval", *FAST], capsys)[0] == 0
    longer = [*FAST[:FAST.index("--horizon")], "--horizon", 12, *FAST[FAST.index("--horizon") + 2:]]
    assert run(["train", "maml-rl", "--steps", 1, "--run-dir", tmp_path / "b", "--no-eval", *longer], capsys)[0] == 0
    code, _, err = run(["plot", tmp_path / "a", "--compare", tmp_path / "b"], capsys)
    assert code == 2 and "its returns are scored otherwise (horizon 10 vs 12)" in err
    assert not (tmp_path / "a" / "plots").exists() or not any((tmp_path / "a" / "plots").iterdir())
