"""MAML++ (Antoniou, Edwards & Storkey 2019): per-step batch norm (BNWB, BNRS) against an
independent per-task loop, the running statistics in training and at evaluation, exact resume
with them, and the ``maml++`` preset."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from batches import image_batch
from cli_runner import run
from metalearn.algorithms.maml import MAML
from metalearn.api import resolve_config
from metalearn.distributed import World
from metalearn.errors import ConfigError, MetalearnError, MetalearnWarning
from metalearn.models import MLP, Conv4, mamlpp_conv4
from metalearn.models.norm import BatchStatNorm, inner_step
from metalearn.training import build_trainer
from reference import ref_task_loss

STEPS = 2  # trained inner steps of the small learners below


def small_learner(seed=0, **options) -> MAML:
    """MAML++ on a 4-filter max-pool, leaky-ReLU Conv4 (the conv4-mamlpp layout) in float64."""
    torch.manual_seed(seed)
    config = MAML.Config(inner_lr=0.3, inner_steps=STEPS, test_inner_steps=3, **options)
    learner = MAML(Conv4(1, 3, hidden=4, pooling="max", leaky=True), config).double()
    with torch.no_grad():  # per-step sets that differ, so that using the wrong one shows
        for module in learner.model.modules():
            if isinstance(module, BatchStatNorm) and module.per_step_weights:
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return learner


def ref_forward(params, x, k, running=None, record=None):
    """The network by hand: block b is conv (stride 1, padding 1), batch norm with set
    ``min(k, STEPS - 1)`` of its per-step scale and offset (a (STEPS, C) tensor) or the shared
    one, leaky ReLU, 2x2 max-pool; then the head on the averaged map. ``running``: {block: (mean,
    var)} per-step running statistics to normalise with (eval), else the batch's statistics;
    ``record``: a dict that gathers each block's batch (mean, unbiased var) under (block, set)."""
    k = min(k, STEPS - 1)
    for b in range(4):
        x = F.conv2d(x, params[f"features.{b}.0.weight"], None, padding=1)
        weight, bias = params[f"features.{b}.1.weight"], params[f"features.{b}.1.bias"]
        if weight.dim() == 2:
            weight, bias = weight[k], bias[k]
        if record is not None:
            record.setdefault((b, k), []).append(torch.stack([x.detach().mean(dim=(0, 2, 3)),
                                                              x.detach().var(dim=(0, 2, 3), unbiased=True)]))
        if running is not None:
            mean, var = running[b]
            x = F.batch_norm(x, mean[k], var[k], weight, bias, training=False, eps=1e-5)
        else:
            x = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
        x = F.max_pool2d(F.leaky_relu(x, 0.01), 2)
    return F.linear(x.mean(dim=(-2, -1)), params["head.weight"], params["head.bias"])


def ref_trajectory(learner, x, y, steps, first_order, running=None, record=None):
    """The inner loop by hand with torch.autograd.grad: the parameters after 0..steps steps,
    step k's support pass with set k, step sizes per tensor and step (the last beyond)."""
    params = dict(learner.model.named_parameters())
    norm = lambda n: n.startswith("features.") and n.split(".")[2] == "1"  # features.{block}.1: the batch norm
    adapted = [n for n in params if learner.config.adapt_norm or not norm(n)]
    trajectory = [params]
    for k in range(steps):
        loss = ref_task_loss(ref_forward(params, x, k, running, record), y)
        grads = torch.autograd.grad(loss, [params[n] for n in adapted], create_graph=not first_order)
        lr = lambda n: learner.inner_lrs[n.replace(".", "__")][min(k, STEPS - 1)]
        params = {**params, **{n: params[n] - lr(n) * (g.detach() if first_order else g)
                               for n, g in zip(adapted, grads)}}
        trajectory.append(params)
    return trajectory


def annealed_weights(progress):
    """MAML++'s multi-step loss weights for STEPS steps, by hand."""
    earlier = max((1 - progress) / STEPS, 0.03 / STEPS)
    return [earlier] * (STEPS - 1) + [1 - earlier * (STEPS - 1)]


def ref_meta_loss(learner, batch, first_order, weights, record=None):
    """The mean over tasks of the weighted query losses after each step, the query pass after
    step k with set k."""
    total = 0.0
    for t in range(batch.support_x.shape[0]):
        trajectory = ref_trajectory(learner, batch.support_x[t], batch.support_y[t], STEPS, first_order,
                                    record=record)
        for k in range(STEPS):
            if weights[k]:
                query = ref_forward(trajectory[k + 1], batch.query_x[t], k, record=record)
                total = total + weights[k] * ref_task_loss(query, batch.query_y[t])
    return total / batch.support_x.shape[0]


@pytest.mark.parametrize("adapt_norm", [False, True])
def test_meta_gradient_with_every_option_equals_a_per_task_loop_at_both_orders(adapt_norm):
    """LSLR, the annealed multi-step loss, derivative-order annealing (first order at step 0,
    second from step 1), BNWB and BNRS together: every meta-gradient, the step sizes' and the
    per-step sets' included, equals torch.autograd.grad through the loop above (float64)."""
    learner = small_learner(learn_inner_lr=True, multi_step_loss=True, multi_step_anneal_steps=4,
                            first_order_steps=1, per_step_bn_weights=True, per_step_bn_statistics=True,
                            adapt_norm=adapt_norm)
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=16, seed=1)
    parameters = list(learner.parameters())
    for step, first_order in ((0, True), (1, False)):
        learner.start_step(step)
        learner.zero_grad()
        learner.meta_loss(batch)[0].backward()
        expected = torch.autograd.grad(ref_meta_loss(learner, batch, first_order, annealed_weights(step / 4)),
                                       parameters, allow_unused=True)
        for (name, p), want in zip(learner.named_parameters(), expected):
            want = torch.zeros_like(p) if want is None else want
            torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
        learner.end_step(World())
    # the two orders differ, so the comparison above told them apart
    assert not torch.allclose(*[torch.autograd.grad(ref_meta_loss(learner, batch, order, [0.5, 0.5]),
                                                    learner.model.head.weight)[0] for order in (True, False)])


def test_per_step_bn_parameters_get_gradient_only_through_their_own_step():
    """Plain last-step loss: at first order only the final query pass (step 1's, set 1) reaches
    the batch-norm sets, so set 0's gradient is exactly zero; at second order set 0 gets its
    gradient through step 0's support pass. The gradient of set 1 is the same whether set 0
    changes or not, and the reverse, at first order: each set acts only in its own step."""
    learner = small_learner(per_step_bn_weights=True, adapt_norm=False, first_order=True)
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=16, seed=2)
    learner.meta_loss(batch)[0].backward()
    bias = learner.model.features[0][1].bias
    assert bias.shape == (STEPS, 4)
    assert torch.equal(bias.grad[0], torch.zeros(4)) and bias.grad[1].abs().sum() > 0

    second = small_learner(per_step_bn_weights=True, adapt_norm=False)
    second.meta_loss(batch)[0].backward()
    assert (second.model.features[0][1].bias.grad[0].abs() > 0).all()

    # set k's value reaches the forward only inside inner_step(k)
    norm, x = learner.model.features[1][1], torch.randn(5, 4, 3, 3, dtype=torch.float64)
    for k in range(STEPS + 2):
        with inner_step(k), torch.no_grad():
            want = F.batch_norm(x, None, None, norm.weight[min(k, STEPS - 1)], norm.bias[min(k, STEPS - 1)],
                                training=True, eps=1e-5)
            torch.testing.assert_close(norm(x), want)


def test_running_statistics_are_updated_per_step_and_normalise_at_evaluation():
    """One meta-step: each set's running mean and variance move 10% of the way to the task
    average of the batch statistics of the forward passes that used it (step k's support pass
    and the query pass after it). In eval mode every pass normalises with its step's running
    statistics (test-time step 3 reuses the last set), as the paper describes."""
    learner = small_learner(per_step_bn_weights=True, per_step_bn_statistics=True, multi_step_loss=True,
                            adapt_norm=False, learn_inner_lr=True)
    batch = image_batch(tasks=3, ways=3, shots=2, query=2, size=16, seed=3)
    record_per_task = []
    for t in range(3):
        record = {}
        ref_meta_loss(learner, type(batch)(batch.support_x[t:t + 1], batch.support_y[t:t + 1],
                                           batch.query_x[t:t + 1], batch.query_y[t:t + 1], 3),
                      True, [0.5, 0.5], record)
        record_per_task.append({key: torch.stack(values).mean(0) for key, values in record.items()})
    learner.meta_loss(batch)
    norms = [learner.model.features[b][1] for b in range(4)]
    before = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    assert all(torch.equal(m, torch.zeros_like(m)) and torch.equal(v, torch.ones_like(v)) for m, v in before)
    learner.end_step(World())
    for b, norm in enumerate(norms):
        for k in range(STEPS):
            mean, var = torch.stack([r[(b, k)] for r in record_per_task]).mean(0)
            # momentum 0.1: torch's batch norm's, which the authors' code (HowToTrainYourMAMLPytorch) keeps
            torch.testing.assert_close(norm.running_mean[k], 0.1 * mean)
            torch.testing.assert_close(norm.running_var[k], 0.9 + 0.1 * var)
    assert not torch.allclose(norms[0].running_mean[0], norms[0].running_mean[1])

    # evaluation: the running statistics of each step, in every pass
    learner.eval()
    running = {b: (n.running_mean, n.running_var) for b, n in enumerate(norms)}
    predicted = learner.predict_per_step(batch)
    assert predicted.shape[0] == 4  # 0..3 steps: one beyond the trained two
    for t in range(3):
        trajectory = ref_trajectory(learner, batch.support_x[t], batch.support_y[t], 3, True, running)
        for j, params in enumerate(trajectory):
            want = ref_forward(params, batch.query_x[t], max(j - 1, 0), running).detach()
            torch.testing.assert_close(predicted[j, t], want, msg=lambda m: f"task {t}, step {j}: {m}")
    learner.train()
    assert not torch.allclose(learner.predict(batch), predicted[-1])  # training mode: batch statistics


def test_without_running_statistics_evaluation_uses_the_batch_statistics():
    """The authors' released code: F.batch_norm(training=True) at evaluation too, so what it
    gathers never normalises; that is per_step_bn_statistics off (no buffers at all)."""
    learner = small_learner(per_step_bn_weights=True)
    assert not list(learner.buffers())
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=16, seed=4)
    train_mode = learner.predict(batch)
    learner.eval()
    torch.testing.assert_close(learner.predict(batch), train_mode)


def test_weights_trained_with_running_statistics_evaluate_without_them():
    """``eval --set per_step_bn_statistics=false`` scores a MAML++ run as the authors' code does
    (batch statistics): the checkpoint's running statistics are left unused, the rest loads."""
    trained = small_learner(per_step_bn_weights=True, per_step_bn_statistics=True)
    plain = small_learner(seed=1, per_step_bn_weights=True)
    plain.load_state_dict(trained.state_dict())
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=16, seed=5)
    trained.train()
    plain.eval()
    torch.testing.assert_close(plain.predict(batch), trained.predict(batch))


def test_running_statistics_gathered_but_evaluated_with_batch_statistics():
    """eval_bn_statistics="batch" (the maml++ preset): training gathers the per-step running
    statistics as before, and evaluation normalises with each task's own statistics, as the
    authors' code does; "running" normalises with the gathered ones."""
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=16, seed=6)
    learners = {}
    for how in ("batch", "running"):
        learner = small_learner(per_step_bn_weights=True, per_step_bn_statistics=True, eval_bn_statistics=how)
        learner.meta_loss(batch)
        learner.end_step(World())
        learners[how] = learner
    gathered = [b for b in learners["batch"].buffers()]
    assert gathered and all(torch.equal(a, b) for a, b in zip(gathered, learners["running"].buffers()))
    assert not torch.equal(gathered[0], torch.zeros_like(gathered[0]))
    train_mode = learners["batch"].predict(batch)
    for learner in learners.values():
        learner.eval()
    torch.testing.assert_close(learners["batch"].predict(batch), train_mode)
    assert not torch.allclose(learners["running"].predict(batch), train_mode)
    with pytest.raises(ConfigError, match="eval_bn_statistics must be running or batch"):
        MAML.Config(eval_bn_statistics="both")


def test_per_step_options_need_a_batch_norm_network():
    for option in ("per_step_bn_weights", "per_step_bn_statistics"):
        with pytest.raises(ConfigError, match=f"MAML.Config.{option} needs a network with batch norm"):
            MAML(MLP(), MAML.Config(**{option: True}))


def test_mamlpp_network_is_built_as_the_authors_code():
    model = mamlpp_conv4(1, 20)
    assert [type(m).__name__ for m in model.features[0]] == ["Conv2d", "BatchStatNorm", "LeakyReLU", "MaxPool2d"]
    assert model.features[0][0].stride == (1, 1) and model.features[3][0].out_channels == 64
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 20)
    assert torch.equal(model.head.bias, torch.zeros(20))
    bound = (6 / (64 * 9 + 64 * 9)) ** 0.5  # Xavier uniform, as their MetaConv2dLayer
    weight = model.features[1][0].weight
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound


def test_the_maml_plus_plus_preset_and_its_overrides():
    config = resolve_config("maml", task={"ways": 20}, preset="maml++")
    m, train = config.method_config, config.train
    assert (m["model"], m["inner_lr"], m["inner_steps"], m["test_inner_steps"]) == ("conv4-mamlpp", 0.1, 5, 5)
    assert m["learn_inner_lr"] and m["multi_step_loss"] and m["per_step_bn_weights"] and m["per_step_bn_statistics"]
    assert m["eval_bn_statistics"] == "batch"  # the authors' code's evaluation
    assert (m["multi_step_anneal_steps"], m["first_order_steps"], m["adapt_norm"]) == (5000, 25000, False)
    assert (train.steps, train.meta_batch_size, train.meta_lr, train.lr_anneal, train.min_meta_lr) == \
        (50000, 8, 1e-3, "cosine", 1e-5)
    assert (train.val_every, train.val_episodes, train.keep_best) == (500, 600, 5)
    # one query image a class on Omniglot at every number of shots, as the authors' configurations
    # (num_target_samples: 1); a query given wins, and without the preset MAML queries K
    shots5 = dict(ways=5, shots=5)
    assert (config.task.query, resolve_config("maml", task=shots5, preset="maml++").task.query) == (1, 1)
    assert resolve_config("maml", task={**shots5, "query": 5}, preset="maml++").task.query == 5
    assert resolve_config("maml", task=shots5).task.query == 5
    # each part stays its own option: the ablation turns one off
    ablated = resolve_config("maml", method_config={"per_step_bn_statistics": False, "inner_steps": 3},
                             train={"meta_batch_size": 16}, preset="maml++")
    assert not ablated.method_config["per_step_bn_statistics"] and ablated.method_config["per_step_bn_weights"]
    assert ablated.method_config["inner_steps"] == 3 and ablated.train.meta_batch_size == 16
    with pytest.raises(MetalearnError, match=r"maml has no preset 'maml\+\+\+' \(its presets: maml\+\+\)"):
        resolve_config("maml", preset="maml+++")
    with pytest.raises(MetalearnError, match="protonet has no preset 'maml\\+\\+' \\(its presets: none\\)"):
        resolve_config("protonet", preset="maml++")
    with pytest.raises(MetalearnError, match="sinusoid is regression"):
        resolve_config("maml", task={"dataset": "sinusoid"}, preset="maml++")
    with pytest.raises(MetalearnError, match="a resumed run keeps the options it saved"):
        resolve_config("maml", preset="maml++", resume_from="somewhere")


def test_turning_a_preset_part_off_drops_the_preset_values_that_only_it_uses():
    """The paper's ablation turns one part off with one option: the preset's values that act only
    beside that part go back to their plain defaults (a user's own value stays, and is refused
    as before); a preset value the user's options contradict is named as the preset's."""
    first = resolve_config("maml", task={"ways": 20}, method_config={"first_order": True}, preset="maml++")
    assert first.method_config["first_order"] and first.method_config["first_order_steps"] == 0
    no_msl = resolve_config("maml", task={"ways": 20}, method_config={"multi_step_loss": False}, preset="maml++")
    assert no_msl.method_config["multi_step_anneal_steps"] == 0 and no_msl.method_config["first_order_steps"] == 25000
    no_ca = resolve_config("maml", task={"ways": 20}, train={"lr_anneal": "none"}, preset="maml++")
    assert (no_ca.train.lr_anneal, no_ca.train.min_meta_lr) == ("none", 0.0)
    # the ablation commands of the docs, with the value given explicitly too: the same runs
    assert resolve_config("maml", task={"ways": 20}, method_config={"multi_step_loss": False,
                                                                    "multi_step_anneal_steps": 0},
                          preset="maml++") == no_msl
    assert resolve_config("maml", task={"ways": 20}, train={"lr_anneal": "none", "min_meta_lr": 0.0},
                          preset="maml++") == no_ca
    lake = resolve_config("maml", task={"ways": 20, "split": "lake"}, preset="maml++")
    assert (lake.train.val_every, lake.train.keep_best) == (0, 0)  # no validation part: nothing to keep
    with pytest.raises(ConfigError, match=r"min_meta_lr must be at most TrainConfig.meta_lr, got 1e-05 \(the value "
                                          r"of preset='maml\+\+': give TrainConfig.min_meta_lr to change it\)$"):
        resolve_config("maml", task={"ways": 20}, train={"meta_lr": 1e-6}, preset="maml++")
    with pytest.raises(ConfigError, match="first_order_steps switches from first to second order"):
        resolve_config("maml", task={"ways": 20}, method_config={"first_order": True, "first_order_steps": 10},
                       preset="maml++")
    with pytest.raises(ConfigError, match="eval_bn_statistics applies only with MAML.Config.per_step_bn_statistics"):
        resolve_config("maml", method_config={"eval_bn_statistics": "batch"})  # without per-step statistics


def test_a_schedule_that_the_steps_end_before_is_warned(capsys):
    """A preset's schedule kept for a short run never switches to second order, never finishes
    the multi-step anneal and never validates: each is said (the run is still made)."""
    code, out, err = run(["train", "maml", "--preset", "maml++", "--ways", 20, "--steps", 100, "--print-config"], capsys)
    assert code == 0 and '"steps": 100' in out
    assert "--first-order-steps 25000 lies at or beyond --steps 100" in err
    assert "--multi-step-anneal-steps 5000 lies at or beyond --steps 100" in err
    assert "--keep-best 5 keeps no checkpoint: validation every 500 steps never runs in --steps 100" in err
    code, _, err = run(["train", "maml", "--preset", "maml++", "--ways", 20, "--print-config"], capsys)
    assert code == 0 and "lies at or beyond" not in err and "keeps no checkpoint" not in err


def test_the_preset_on_the_command_line(capsys, monkeypatch):
    import metalearn.api

    seen = {}

    def resolve(method, **given):  # what the command line hands on; resolving is tested above
        seen.update(given, method=method)
        raise MetalearnError("resolved")

    monkeypatch.setattr(metalearn.api, "resolve_config", resolve)
    code, _, err = run(["train", "maml", "--preset", "maml++", "--inner-steps", 3, "--print-config"], capsys)
    assert code == 2 and "resolved" in err
    assert seen["method"] == "maml" and seen["preset"] == "maml++" and seen["method_config"] == {"inner_steps": 3}
    code, _, err = run(["train", "maml", "--preset", "nope", "--print-config"], capsys)
    assert code == 2 and "nope" in err
    code, _, err = run(["train", "protonet", "--preset", "maml++"], capsys)
    assert code == 2 and "--preset" in err


def test_resume_is_exact_with_per_step_running_statistics(tmp_path, omniglot_data_dir):
    """The running statistics are buffers of the checkpoint: a run cut at step 2 of 3 (after the
    derivative-order switch at step 1, validation at every step) resumes to the uninterrupted
    run's weights, step sizes and statistics. (On the stride-2 conv4, the cheaper network.)"""
    def config(steps):
        return resolve_config("maml", task={"dataset": "omniglot", "ways": 3, "shots": 1},
                              method_config={"inner_steps": 2, "test_inner_steps": 2, "first_order_steps": 1,
                                             "model": "conv4"},
                              train={"steps": steps, "meta_batch_size": 2, "val_every": 1, "val_episodes": 2,
                                     "checkpoint_every": 2, "log_every": 1, "lr_anneal": "none", "min_meta_lr": 0.0},
                              preset="maml++")

    straight = build_trainer(config(3), tmp_path / "a", data_dir=omniglot_data_dir)
    straight.fit(progress=False)
    build_trainer(config(2), tmp_path / "b", data_dir=omniglot_data_dir).fit(progress=False)
    resumed = build_trainer(config(3), tmp_path / "b", data_dir=omniglot_data_dir, resume=True)
    resumed.fit(progress=False)
    a, b = straight.learner.state_dict(), resumed.learner.state_dict()
    assert "model.features.0.1.running_mean" in a
    assert not torch.equal(a["model.features.0.1.running_mean"], torch.zeros_like(a["model.features.0.1.running_mean"]))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_chunks_gather_the_running_statistics_of_the_whole_batch():
    """--task-chunk: the per-step running statistics move to the average over all the meta-batch's
    tasks, whether one meta_loss call sees them or one call per chunk does; start_step drops
    what earlier passes of the step gathered (the trial passes of --task-chunk auto)."""
    from metalearn.training import meta_gradient

    batch = image_batch(tasks=4, ways=3, shots=2, query=2, size=16, seed=3)
    statistics = {}
    for chunk in (0, 1, 3):  # 3: chunks of 3 and 1
        learner = small_learner(per_step_bn_weights=True, per_step_bn_statistics=True, multi_step_loss=True,
                                adapt_norm=False)
        learner.start_step(0)
        if chunk == 3:  # a trial pass on two tasks, as --task-chunk auto makes, then the step begins anew
            learner.meta_loss(batch.select(slice(0, 2)))
            learner.start_step(0)
        meta_gradient(learner, batch, chunk)
        learner.end_step(World())
        statistics[chunk] = {name: value for name, value in learner.state_dict().items() if "running" in name}
    assert statistics[0] and not torch.equal(statistics[0]["model.features.0.1.running_mean"],
                                             torch.zeros_like(statistics[0]["model.features.0.1.running_mean"]))
    for chunk in (1, 3):
        for name, value in statistics[0].items():
            torch.testing.assert_close(statistics[chunk][name], value, rtol=1e-12, atol=1e-15, msg=name)


def test_auto_chunks_are_measured_again_where_the_step_changes(tmp_path, monkeypatch, omniglot_data_dir):
    """--task-chunk auto under the preset: the chunk is chosen at the first step, again after the
    multi-step loss is annealed away and again at the switch to second order (which needs about
    twice the memory), and the run trains what the whole batch does, running statistics included.
    Plain SGD steps compare the runs: Adam's first steps move each weight by about the learning
    rate whatever its gradient's size, so a gradient that rounds to another sign in another
    summation order (the processor's vector width decides) moves a weight the other way. Chunks
    of 2 tasks: vmapped as the whole batch is. A single task runs outside vmap, which rounds
    otherwise, and this 3-way 1-shot network (its last batch norm normalises 3 values a channel)
    is chaotic enough that rounding grows to percents in three steps; its meta-gradient equals
    the batch's at equal weights (tests/test_maml.py)."""
    from metalearn.training import Trainer

    def config(chunk, steps=4):
        return resolve_config("maml", task={"dataset": "omniglot", "ways": 3, "shots": 1},
                              method_config={"inner_steps": 2, "test_inner_steps": 2, "first_order_steps": 3,
                                             "multi_step_anneal_steps": 1, "model": "conv4"},
                              train={"steps": steps, "meta_batch_size": 4, "val_every": 0, "checkpoint_every": 4,
                                     "log_every": 1, "lr_anneal": "none", "min_meta_lr": 0.0, "task_chunk": chunk,
                                     "meta_optimizer": "sgd", "meta_lr": 0.1},
                              preset="maml++")

    chosen_at = []
    choose = Trainer._choose_task_chunk

    def recording(self, batch, bar):
        chosen_at.append(self.step)
        return choose(self, batch, bar)

    monkeypatch.setattr(Trainer, "_choose_task_chunk", recording)
    monkeypatch.setattr("metalearn.training.available_memory", lambda device: 2**40)
    monkeypatch.setattr("metalearn.training.fastest_chunk", lambda seconds: 2)  # timed, and chunks of 2 chosen
    auto = build_trainer(config("auto"), tmp_path / "auto", data_dir=omniglot_data_dir)
    auto.fit(progress=False)
    assert chosen_at == [0, 1, 3] and auto.task_chunk == 2
    whole = build_trainer(config(0), tmp_path / "whole", data_dir=omniglot_data_dir)
    whole.fit(progress=False)
    a, b = whole.learner.state_dict(), auto.learner.state_dict()
    initial = build_trainer(config(0), tmp_path / "initial", data_dir=omniglot_data_dir).learner.state_dict()
    assert (a["model.head.weight"] - initial["model.head.weight"]).abs().max() > 1e-2  # it trained
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_best_validation_checkpoints_are_kept_and_evaluated_as_an_ensemble(tmp_path, capsys):
    """--keep-best 2 keeps the checkpoints of the two best validations (lowest MSE here; ties:
    the earlier step); eval --ensemble scores the average of their predictions on the run's
    test episodes, as MAML++'s code averages the logits of its best checkpoints."""
    from metalearn.api import evaluate_run
    from metalearn.checkpoints import load_trained
    from metalearn.runs import RunDir
    from metalearn.tasks import build_task_source
    from metalearn.training import TEST_SEED_OFFSET

    config = resolve_config("maml", task={"dataset": "sinusoid", "shots": 5}, method_config={"test_inner_steps": 2},
                            train={"steps": 6, "meta_batch_size": 4, "log_every": 1, "val_every": 1,
                                   "val_episodes": 8, "checkpoint_every": 3, "eval_episodes": 10, "keep_best": 2,
                                   "meta_lr": 0.01})
    run_dir = tmp_path / "run"
    build_trainer(config, run_dir).fit(progress=False)
    folder = RunDir(run_dir)
    validations = [(r["val_mse"], r["step"]) for r in folder.read_metrics() if "val_mse" in r]
    best = [step for _, step in sorted(validations)[:2]]
    paths = folder.best_checkpoints()
    assert [p.name for p in paths] == [f"step-{step}.pt" for step in best]
    assert sorted(p.name for p in folder.best_dir.glob("*.pt")) == sorted(p.name for p in paths)

    result = evaluate_run(run_dir, progress=False, ensemble=True)
    assert result["ensemble"] == best and result["step"] == 6
    members = [load_trained(run_dir, checkpoint=path)[1] for path in paths]
    batch = build_task_source(config.task, "test").sample(10, torch.Generator().manual_seed(TEST_SEED_OFFSET))
    average = torch.stack([member.predict(batch) for member in members]).mean(0)
    mse = ((average - batch.query_y) ** 2).flatten(1).mean(-1)
    torch.testing.assert_close(torch.tensor(result["scores"], dtype=mse.dtype), mse, rtol=1e-5, atol=1e-7)
    assert (run_dir / "eval-ensemble=2.json").is_file()
    # the final step alone (--final-only) averages the members' predictions too
    final_only = evaluate_run(run_dir, progress=False, ensemble=True, per_step=False)
    torch.testing.assert_close(torch.tensor(final_only["scores"], dtype=mse.dtype), mse, rtol=1e-5, atol=1e-7)

    code, out, _ = run(["eval", run_dir, "--ensemble", "--no-progress"], capsys)
    assert code == 0 and "eval-ensemble=2.json" in out
    plain = tmp_path / "plain"
    build_trainer(resolve_config("maml", task={"dataset": "sinusoid"},
                                 train={"steps": 1, "val_every": 0, "eval_episodes": 2}), plain).fit(progress=False)
    code, _, err = run(["eval", plain, "--ensemble", "--no-progress"], capsys)
    assert code == 2 and "kept no best checkpoints: train with --keep-best N" in err
    early = tmp_path / "early"  # keeps the best, but has not validated yet
    with pytest.warns(MetalearnWarning, match="^keep_best=2 keeps no checkpoint"):
        config = resolve_config("maml", task={"dataset": "sinusoid"},
                                train={"steps": 1, "val_every": 100, "keep_best": 2, "eval_episodes": 2})
    build_trainer(config, early).fit(progress=False)
    code, _, err = run(["eval", early, "--ensemble", "--no-progress"], capsys)
    assert code == 2 and "holds no best checkpoints yet: it keeps 2 by validation every 100 steps" in err


def test_resume_ignores_a_difference_in_an_option_that_acts_in_neither_configuration():
    """A stored configuration may hold ``eval_bn_statistics`` "batch" beside
    ``--no-per-step-bn-statistics`` (saved by a version whose preset kept it there), where the same
    command resolves "running". Neither normalises with per-step statistics, so the resume goes on;
    where both do, it is refused."""
    from metalearn.checkpoints import check_compatible

    now = resolve_config("maml", task={"ways": 20}, method_config={"per_step_bn_statistics": False}, preset="maml++")
    assert now.method_config["eval_bn_statistics"] == "running"
    older = dataclasses.replace(now, method_config={**now.method_config, "eval_bn_statistics": "batch"})
    check_compatible(older, now, "the run")
    both = resolve_config("maml", task={"ways": 20}, preset="maml++")
    other = dataclasses.replace(both, method_config={**both.method_config, "eval_bn_statistics": "running"})
    with pytest.raises(MetalearnError, match="eval_bn_statistics"):
        check_compatible(both, other, "the run")
