"""The Neural Statistician: its distributions and bound against torch.distributions, the
statistic's symmetry, learning on a small problem, sampling, training augmentation, resume, two
ranks, bad input."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import distributions as D

from checkpoints import assert_same_weights, weights
from cli_runner import run
from metalearn.algorithms.statistician import (NeuralStatistician, StatisticianConfig, bernoulli_log_likelihood,
                                               dilate_images, gaussian_kl, standard_normal_kl)
from metalearn.errors import ConfigError, MetalearnError
from metalearn.runs import RunDir
from metalearn.tasks.batch import TaskBatch
from metalearn.training import build_trainer

# the paper's plain networks (no normalisation, no sample dropout): every set computed on its own
TINY = StatisticianConfig(context_dim=6, latent_dim=3, latent_layers=2, hidden_dim=16, filters=4, conv_norm="none",
                          sample_dropout=0.0)
TINY_FLAGS = ["--context-dim", 6, "--latent-dim", 3, "--latent-layers", 2, "--hidden-dim", 16, "--filters", 4]


def tiny(config: StatisticianConfig = TINY, seed: int = 0) -> NeuralStatistician:
    torch.manual_seed(seed)
    return NeuralStatistician(config)


def binary_images(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, 1, 28, 28, generator=g) < 0.2).float()


# -- the pieces against torch.distributions ----------------------------------------------------


def test_gaussian_kl_and_bernoulli_log_likelihood_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2, l1, l2 = (torch.randn(4, 7, generator=g) for _ in range(4))
    q, p = D.Normal(m1, (0.5 * l1).exp()), D.Normal(m2, (0.5 * l2).exp())
    torch.testing.assert_close(gaussian_kl(m1, l1, m2, l2), D.kl_divergence(q, p).sum(-1))
    prior = D.Normal(torch.zeros(4, 7), torch.ones(4, 7))
    torch.testing.assert_close(standard_normal_kl(m1, l1), D.kl_divergence(q, prior).sum(-1))
    logits, x = torch.randn(3, 2, 1, 28, 28, generator=g), binary_images(3, 2)
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x),
                               D.Bernoulli(logits=logits).log_prob(x).sum((-3, -2, -1)))


def test_the_bound_of_a_tiny_model_matches_an_independent_computation():
    """Each set alone, two stochastic layers, every density and divergence from torch.distributions."""
    model = tiny().double()
    sets = binary_images(3, 4).double()
    g = torch.Generator().manual_seed(2)
    noise = {"c": torch.randn(3, 6, generator=g, dtype=torch.float64),
             "z": torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)}
    terms = model.bound_terms(sets, noise)
    for s in range(3):
        x = sets[s]  # (n, 1, 28, 28)
        h = model.encoder(x)  # (n, features)
        pooled = model.statistic.pre(h).sum(0) / x.shape[0]
        c_mean, c_logvar = model.statistic.post(pooled).chunk(2, -1)
        q_c = D.Normal(c_mean, (0.5 * c_logvar).exp())
        c = c_mean + q_c.stddev * noise["c"][s]
        kl_c = D.kl_divergence(q_c, D.Normal(torch.zeros(6), torch.ones(6))).sum()
        zs, kl_z, above = [], 0.0, None
        for layer in range(2):
            q_mean, q_logvar = model.inference[layer](c.view(1, 1, -1), h.unsqueeze(0), above)
            p_mean, p_logvar = model.latent_decoders[layer](c.view(1, 1, -1), None, above)
            q_z, p_z = D.Normal(q_mean[0], (0.5 * q_logvar[0]).exp()), D.Normal(p_mean[0], (0.5 * p_logvar[0]).exp())
            kl_z = kl_z + D.kl_divergence(q_z, p_z).sum()
            z = q_z.mean + q_z.stddev * noise["z"][s, :, layer]
            zs.append(z)
            above = z.unsqueeze(0)
        logits = model.decoder(torch.cat(zs, -1).unsqueeze(0), c.view(1, 1, -1))[0]
        log_likelihood = D.Bernoulli(logits=logits).log_prob(x).sum()
        torch.testing.assert_close(terms["log_likelihood"][s], log_likelihood)
        torch.testing.assert_close(terms["kl_context"][s], kl_c)
        torch.testing.assert_close(terms["kl_latent"][s], kl_z)


def test_the_statistic_is_permutation_invariant_and_depends_on_every_member():
    model = tiny().double()  # in float64 a reordering changes the mean pooling's sum by ~1e-16 only
    sets = binary_images(2, 5).double()
    mean, logvar = model.context(sets)
    order = torch.tensor([3, 0, 4, 1, 2])
    mean_p, logvar_p = model.context(sets[:, order])
    torch.testing.assert_close(mean_p, mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(logvar_p, logvar, atol=1e-12, rtol=0)
    for member in range(5):
        changed = sets.clone()
        changed[:, member] = binary_images(2, seed=10 + member).double()
        assert (model.context(changed)[0] - mean).abs().max(dim=1).values.min() > 1e-8, member


# -- learning, classification, sampling --------------------------------------------------------


def block_templates(classes: int, seed: int = 3) -> torch.Tensor:
    """(classes, 28, 28): each class fills a random subset of the nine blocks of a 3 x 3 grid."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.zeros(classes, 28, 28)
    for t in range(classes):
        for block in torch.nonzero(torch.rand(9, generator=g) < 0.5).flatten().tolist():
            r, c = divmod(block, 3)
            templates[t, 1 + 9 * r: 9 + 9 * r, 1 + 9 * c: 9 + 9 * c] = 1
    return templates


def template_tasks(tasks: int, ways: int, shots: int, query: int, templates: torch.Tensor,
                   g: torch.Generator) -> TaskBatch:
    """Tasks over a fixed set of templates: each image its class's template with 5% of its
    pixels flipped."""
    classes = torch.rand(tasks, len(templates), generator=g).argsort(1)[:, :ways]
    images = templates[classes].unsqueeze(2).expand(-1, -1, shots + query, -1, -1)
    images = torch.where(torch.rand(images.shape, generator=g) < 0.05, 1 - images, images).unsqueeze(3)
    labels = torch.arange(ways)
    return TaskBatch(images[:, :, :shots].reshape(tasks, ways * shots, 1, 28, 28),
                     labels.repeat_interleave(shots).repeat(tasks, 1),
                     images[:, :, shots:].reshape(tasks, ways * query, 1, 28, 28),
                     labels.repeat_interleave(query).repeat(tasks, 1), ways=ways)


def test_learning_improves_the_bound_classifies_far_above_chance_and_samples_new_images():
    templates, g = block_templates(8), torch.Generator().manual_seed(0)
    model = tiny(StatisticianConfig(context_dim=8, latent_dim=2, latent_layers=1, hidden_dim=32, filters=4,
                                    reweight_alpha=0.0))
    test = template_tasks(50, 3, 1, 5, templates, torch.Generator().manual_seed(5))  # 3-way 1-shot, chance 1/3

    def accuracy() -> float:
        logits = model.predict(test)
        assert logits.shape == (50, 15, 3) and bool((logits <= 1e-5).all())  # -KL
        return float((logits.argmax(-1) == test.query_y).float().mean())

    untrained = accuracy()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    bounds = []
    for step in range(60):
        model.start_step(step)
        loss, metrics = model.meta_loss(template_tasks(4, 3, 3, 2, templates, g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bounds.append(float(metrics["bound"]))
    first, last = sum(bounds[:10]) / 10, sum(bounds[-10:]) / 10
    assert last > first + 30, (first, last)  # nats per image, from about -540
    trained = accuracy()
    assert untrained < 0.75 and trained > 0.9, (untrained, trained)

    inputs = NeuralStatistician.support_sets(template_tasks(2, 3, 4, 1, templates, g))  # (6, 4, 1, 28, 28)
    samples = model.sample(inputs, num=7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (6, 7, 1, 28, 28)
    assert float(samples.min()) >= 0 and float(samples.max()) <= 1
    drawn = (samples > 0.5).float()
    nearest = (drawn.unsqueeze(2) - inputs.unsqueeze(1)).abs().mean((-3, -2, -1)).min(-1).values
    assert float(nearest.min()) > 0.01  # new images, not copies of the inputs
    assert torch.equal(samples, model.sample(inputs, num=7, generator=torch.Generator().manual_seed(0)))


def test_context_encodes_many_images_in_pieces_with_the_same_result(monkeypatch):
    from metalearn.algorithms import statistician

    model = tiny()
    sets = binary_images(7, 3)  # 21 images
    whole = model.context(sets)
    monkeypatch.setattr(statistician, "IMAGES_PER_PASS", 4)
    passes = []
    model.encoder.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0].shape[0]))
    for a, b in zip(model.context(sets), whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert passes == [4, 4, 4, 4, 4, 1]  # memory bounded by the piece, not by the number of sets


def test_sample_decodes_in_bounded_passes_with_the_same_images(monkeypatch):
    """Many new images are decoded IMAGES_PER_PASS at a time (all sets' images of a sample
    together), with the images of decoding them all at once: the noise is drawn before decoding."""
    from metalearn.algorithms import statistician

    model = tiny()
    sets = binary_images(2, 3)
    whole = model.sample(sets, num=7, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(statistician, "IMAGES_PER_PASS", 4)  # 2 sets: 2 new images of each per pass
    passes = []
    model.decoder.register_forward_hook(lambda module, inputs, output: passes.append(tuple(inputs[0].shape[:2])))
    pieces = model.sample(sets, num=7, generator=torch.Generator().manual_seed(3))
    assert passes == [(2, 2), (2, 2), (2, 2), (2, 1)]
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)
    assert pieces.shape == (2, 7, 1, 28, 28)


@pytest.mark.parametrize("num", [0, -3, 1001, 100_000, 2.0, True])
def test_a_number_of_new_images_outside_1_to_the_limit_is_one_line(num):
    from metalearn.algorithms.base import MAX_SAMPLES

    assert MAX_SAMPLES == 1000
    model = tiny()
    with pytest.raises(MetalearnError, match=r"num must be a whole number from 1 to 1000 \(new images per set\)") as e:
        model.sample(binary_images(1, 2)[0], num=num)
    assert "\n" not in str(e.value)
    assert model.sample(binary_images(1, 2)[0], num=MAX_SAMPLES).shape == (1, MAX_SAMPLES, 1, 28, 28)


def test_rank_batch_norm_is_torchs_batch_norm_in_one_process():
    from metalearn.algorithms.statistician import RankBatchNorm2d

    torch.manual_seed(0)
    ours, reference = RankBatchNorm2d(5), torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        for layer in (ours, reference):
            layer.weight.copy_(torch.linspace(0.5, 2.0, 5))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    x = (torch.randn(6, 5, 4, 4, dtype=torch.float64) * 3 + 1).requires_grad_()
    ours.double(), reference.double()
    for _ in range(2):  # two steps: the running statistics move alike
        out, ref = ours(x), reference(x)
        torch.testing.assert_close(out, ref)
        w = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad((out * w).sum(), [x, ours.weight]),
                                   torch.autograd.grad((ref * w).sum(), [x, reference.weight]))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name))
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(x), reference(x))


def test_sample_dropout_pools_the_kept_images_and_counts_them():
    model = tiny(StatisticianConfig(context_dim=6, latent_dim=3, hidden_dim=16, filters=4, sample_dropout=0.5))
    sets = binary_images(3, 4)
    h = model.encoder(sets.flatten(0, 1)).view(3, 4, -1)
    keep = torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    masked = model.statistic(h, keep)
    for i, kept in enumerate(keep.bool()):  # each set's context is that of its kept images alone
        alone = model.statistic(h[i:i + 1, kept])
        for a, b in zip(masked, alone):
            torch.testing.assert_close(a[i:i + 1], b)
    # training draws the mask per set (the first image always kept, the rest with 1 - p); evaluation keeps all
    noise = model.set_noise(binary_images(200, 5), step=3, binarize=True, training=True)
    assert bool((noise["keep"][:, 0] == 1).all()) and abs(float(noise["keep"][:, 1:].mean()) - 0.5) < 0.06
    assert "keep" not in model.set_noise(sets, step=3, binarize=False)
    # also with threshold binarisation: the training bound drops images, evaluation does not
    threshold = tiny(StatisticianConfig(context_dim=6, latent_dim=3, hidden_dim=16, filters=4, sample_dropout=0.5,
                                        binarize="threshold"))
    assert "keep" in threshold.set_noise(sets, step=3, binarize=False, training=True)
    with pytest.raises(ConfigError, match="sample_dropout"):
        StatisticianConfig(sample_dropout=1.0)
    with pytest.raises(ConfigError, match="conv_norm"):
        StatisticianConfig(conv_norm="layer")


# -- training augmentation: dilation and reflection ---------------------------------------------


def test_dilation_is_the_max_over_the_cross_of_each_pixel():
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 1, 6, 7, generator=g) * (torch.rand(2, 3, 1, 6, 7, generator=g) < 0.3)
    expected = torch.empty_like(images)
    for index in torch.cartesian_prod(*(torch.arange(k) for k in images.shape[:3])).tolist():
        image = images[tuple(index)]
        for r in range(6):
            for c in range(7):
                values = [image[rr, cc] for rr, cc in ((r, c), (r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
                          if 0 <= rr < 6 and 0 <= cc < 7]
                expected[(*index, r, c)] = max(values)
    assert torch.equal(dilate_images(images), expected)
    dot = torch.zeros(5, 5)
    dot[0, 2] = 1.0  # on the border: a cross cut off by the edge
    assert dilate_images(dot).nonzero().tolist() == [[0, 1], [0, 2], [0, 3], [1, 2]]


def augmented(**options) -> StatisticianConfig:
    return dataclasses.replace(TINY, sample_dropout=0.3, **options)


def grey_images(*shape: int, seed: int = 0) -> torch.Tensor:
    """Grey strokes: intensities in (0, 1) on about 20% of the pixels, the rest 0."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, 1, 28, 28, generator=g) * (torch.rand(*shape, 1, 28, 28, generator=g) < 0.2)


def grey_batch(tasks: int = 2, ways: int = 3, shots: int = 2, seed: int = 0) -> TaskBatch:
    support = grey_images(tasks, ways * shots, seed=seed)
    labels = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    return TaskBatch(support, labels, support[:, :ways], torch.arange(ways).repeat(tasks, 1), ways=ways)


def test_augmentation_with_probability_0_trains_as_the_learner_without_it():
    """The loss and gradients with --dilate 0 --reflect 0 are bit for bit those of the bound on
    the plainly binarised sets, and an augmenting learner draws the same binarisation, dropout, c
    and z: its masks come after them."""
    batch = grey_batch()
    off, on = tiny(augmented(dilate=0.0, reflect=0.0)), tiny(augmented(dilate=0.5, reflect=0.5))
    on.load_state_dict(off.state_dict())
    for model in (off, on):
        model.start_step(3)
    raw = NeuralStatistician.support_sets(batch)
    noise = off.set_noise(raw, 3, binarize=True, training=True)
    assert set(noise) == {"c", "z", "keep", "u"}
    terms = off.bound_terms((noise["u"] < raw).float(), noise)
    r, kc, kz = (terms[k] / 2 for k in ("log_likelihood", "kl_context", "kl_latent"))
    expected = -(2 * r - (kc + kz) / 2).mean()  # reweight_alpha 1 at step 3: weight 2
    loss, _ = off.meta_loss(batch)
    assert torch.equal(loss, expected)
    grads = torch.autograd.grad(loss, list(off.parameters()))
    for a, b in zip(grads, torch.autograd.grad(expected, list(off.parameters()))):
        assert torch.equal(a, b)
    noisy = on.set_noise(raw, 3, binarize=True, training=True)
    assert set(noisy) == {"c", "z", "keep", "u", "dilate", "reflect"}
    for key in noise:
        assert torch.equal(noisy[key], noise[key]), key
    assert not torch.equal(on.meta_loss(batch)[0], loss)  # the augmented images do enter the bound


def test_probability_1_dilates_every_training_image_before_binarising():
    model = tiny(augmented(dilate=1.0))
    raw = grey_images(40, 3)
    noise = model.set_noise(raw, 5, binarize=True, training=True)
    assert bool(noise["dilate"].all()) and "reflect" not in noise
    assert torch.equal(model.training_sets(raw, noise), (noise["u"] < dilate_images(raw)).float())
    both = tiny(augmented(dilate=1.0, reflect=1.0))
    noise = both.set_noise(raw, 5, binarize=True, training=True)
    assert torch.equal(both.training_sets(raw, noise), (noise["u"] < dilate_images(raw).flip(-1)).float())
    # half: each image on its own, dilated exactly where its mask says; threshold binarisation too
    half = tiny(augmented(dilate=0.5, binarize="threshold"))
    noise = half.set_noise(raw, 5, binarize=False, training=True)
    mask = noise["dilate"].view(40, 3, 1, 1, 1)
    expected = torch.where(mask, dilate_images(raw) > 0.5, raw > 0.5).float()
    assert torch.equal(half.training_sets(raw, noise), expected)
    assert 0.38 < float(noise["dilate"].float().mean()) < 0.62  # 120 images
    assert bool((noise["dilate"].any(1) & ~noise["dilate"].all(1)).any())  # not a draw per set


def test_reflection_mirrors_whole_sets():
    model = tiny(augmented(reflect=0.5, binarize="threshold"))
    raw = grey_images(60, 4)
    noise = model.set_noise(raw, 2, binarize=False, training=True)
    assert noise["reflect"].shape == (60,) and "dilate" not in noise
    sets = model.training_sets(raw, noise)
    for s in range(60):
        source = raw[s].flip(-1) if bool(noise["reflect"][s]) else raw[s]  # every image of the set alike
        assert torch.equal(sets[s], (source > 0.5).float()), s
    assert 18 < int(noise["reflect"].sum()) < 42


def test_augmentation_draws_follow_the_set_and_the_step_alone():
    model = tiny(augmented(dilate=0.5, reflect=0.5))
    raw = grey_images(30, 3, seed=1)
    noise = model.set_noise(raw, 7, binarize=True, training=True)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))[:12]
    others = torch.cat([raw[order], grey_images(5, 3, seed=2)])  # other company, other order
    moved = model.set_noise(others, 7, binarize=True, training=True)
    for key in ("dilate", "reflect"):
        assert torch.equal(moved[key][:12], noise[key][order]), key
        assert torch.equal(model.set_noise(raw, 7, binarize=True, training=True)[key], noise[key]), key
    later = model.set_noise(raw, 8, binarize=True, training=True)
    assert not torch.equal(later["dilate"], noise["dilate"]) and not torch.equal(later["reflect"], noise["reflect"])


def test_augmentation_never_reaches_evaluation_or_sampling():
    """Classification, the test bound and sampling of an augmenting learner are bit for bit those
    of the same weights without augmentation."""
    plain, augmenting = tiny(augmented()), tiny(augmented(dilate=1.0, reflect=1.0))
    augmenting.load_state_dict(plain.state_dict())
    batch = grey_batch(seed=3)

    class Source:
        def sample(self, size, generator):
            return grey_batch(tasks=size, seed=int(torch.randint(100, (1,), generator=generator)))

    assert torch.equal(augmenting.predict(batch), plain.predict(batch))
    assert augmenting.test_bound(Source(), episodes=3, chunk=2) == plain.test_bound(Source(), episodes=3, chunk=2)
    inputs = NeuralStatistician.support_sets(batch)
    draw = lambda model: model.sample(inputs, num=3, generator=torch.Generator().manual_seed(1))  # noqa: E731
    assert torch.equal(draw(augmenting), draw(plain))
    assert set(augmenting.set_noise(inputs, 0, binarize=False)) == {"c", "z"}  # the test bound's call


@pytest.mark.parametrize("name", ["dilate", "reflect"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_augmentation_probabilities_outside_0_1_are_refused(name, value):
    problem = "must be float" if isinstance(value, (bool, str)) else "must be a probability in \\[0, 1\\]"
    with pytest.raises(ConfigError, match=f"{name} {problem}"):
        StatisticianConfig(**{name: value})
    StatisticianConfig(**{name: 1})  # the bounds themselves are fine


def test_a_bad_augmentation_probability_is_one_line_on_the_command_line(capsys):
    code, _, err = run(["train", "statistician", "--dilate", 2, "--print-config"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--dilate must be a probability in [0, 1], got 2" in err


def test_sets_follow_the_labels_and_bad_sets_are_refused():
    x = binary_images(1, 4)
    batch = TaskBatch(x, torch.tensor([[1, 0, 1, 0]]), x[:, :2], torch.tensor([[0, 1]]), ways=2)
    sets = NeuralStatistician.support_sets(batch)
    assert torch.equal(sets, torch.stack([x[0, [1, 3]], x[0, [0, 2]]]))
    model = tiny()
    empty = TaskBatch(x[:, :0], torch.zeros(1, 0, dtype=torch.long), x[:, :2], torch.tensor([[0, 1]]), ways=2)
    for call in (lambda: model.meta_loss(empty), lambda: model.predict(empty)):
        with pytest.raises(MetalearnError, match="statistician: the batch has no support examples"):
            call()
    with pytest.raises(MetalearnError, match="set of size 0"):
        model.sample(x[0, :0], num=3)
    uneven = TaskBatch(x, torch.tensor([[0, 0, 0, 1]]), x[:, :2], torch.tensor([[0, 1]]), ways=2)
    with pytest.raises(MetalearnError, match="same number"):
        model.meta_loss(uneven)
    with pytest.raises(ConfigError, match="kl_direction"):
        StatisticianConfig(kl_direction="sideways")


def test_the_kl_classifier_takes_the_configured_direction_of_the_divergence():
    """predict's logits are -D_KL(q(c|D_i) || q(c|{x})) by default (support-query, section 5.4)
    and the reverse with query-support, against torch.distributions on the context posteriors."""
    x = binary_images(2, 6)
    batch = TaskBatch(x, torch.tensor([[0, 0, 1, 1, 2, 2]] * 2), binary_images(2, 4, seed=1),
                      torch.tensor([[0, 1, 2, 0]] * 2), ways=3)
    # an untrained statistic gives every set nearly the same posterior, where both directions
    # agree: a fixed random statistic of the set's mean image gives sets posteriors of their own
    projection = torch.randn(784, 12, generator=torch.Generator().manual_seed(0)) / 4

    def context(sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (sets.flatten(2).mean(1) @ projection).chunk(2, dim=-1)

    found = {}
    for direction in ("support-query", "query-support"):
        model = tiny(dataclasses.replace(TINY, kl_direction=direction))
        model.context = context
        mean, logvar = context(NeuralStatistician.support_sets(batch))  # (tasks * ways, d)
        q_mean, q_logvar = context(batch.query_x.reshape(8, 1, 1, 28, 28))  # (tasks * queries, d)
        classes = D.Normal(mean.view(2, 1, 3, -1), (0.5 * logvar).exp().view(2, 1, 3, -1))
        queries = D.Normal(q_mean.view(2, 4, 1, -1), (0.5 * q_logvar).exp().view(2, 4, 1, -1))
        pair = (classes, queries) if direction == "support-query" else (queries, classes)
        found[direction] = model.predict(batch)
        torch.testing.assert_close(found[direction], -D.kl_divergence(*pair).sum(-1), rtol=1e-5, atol=1e-5)
    assert (found["support-query"] - found["query-support"]).abs().max() > 0.1  # the two differ here


def test_the_context_kl_weight_halves_at_each_multiple_of_its_step():
    model = tiny(dataclasses.replace(TINY, reweight_alpha=1.0, alpha_halve_every=10))
    assert [model.alpha(step) for step in (0, 9, 10, 19, 20)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_bad_inputs_are_one_line_and_a_batch_without_queries_predicts_nothing():
    model, x = tiny(), binary_images(2, 4)
    labels = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]])
    no_queries = TaskBatch(x, labels, x[:, :0], torch.zeros(2, 0, dtype=torch.long), ways=2)
    assert model.predict(no_queries).shape == (2, 0, 2)
    as_double = TaskBatch(x.double(), labels, x[:, :2].double(), torch.tensor([[0, 1], [0, 1]]), ways=2)
    with pytest.raises(MetalearnError, match="images are torch.float64 and the networks' weights torch.float32"):
        model.predict(as_double)
    with pytest.raises(MetalearnError, match="images are torch.uint8"):
        model.sample((x[0] * 255).to(torch.uint8), num=2)
    uneven_second = TaskBatch(x, torch.tensor([[0, 1, 0, 1], [0, 0, 0, 1]]), x[:, :2], torch.tensor([[0, 1], [0, 1]]),
                              ways=2)
    with pytest.raises(MetalearnError, match=r"got \[3, 1\] per class in task 1 \(task 0 has \[2, 2\]\)"):
        model.meta_loss(uneven_second)
    beyond = TaskBatch(x, torch.tensor([[0, 1, 0, 2], [0, 1, 0, 1]]), x[:, :2], torch.tensor([[0, 1], [0, 1]]), ways=2)
    with pytest.raises(MetalearnError, match=r"support_y has class ids \[2\] outside 0..1, the tasks being 2-way"):
        model.predict(beyond)


def test_the_test_bound_is_taken_on_the_episodes_evaluation_scores():
    """evaluate draws its episodes EPISODE_CHUNK at a time; the bound's first episodes are those."""
    from metalearn.evaluation import EPISODE_CHUNK, evaluate

    seen = {"evaluate": [], "bound": []}

    class Source:
        into = "evaluate"

        def sample(self, size, generator, tasks=None):
            batch = grey_batch(tasks=size, seed=int(torch.randint(10**6, (1,), generator=generator)))
            seen[self.into].append(batch.support_x)
            return batch

    model, source = tiny(), Source()
    evaluate(model, source, 70, seed=5, per_step=False)
    source.into = "bound"
    model.test_bound(source, 70, seed=5, chunk=EPISODE_CHUNK)
    assert [len(x) for x in seen["evaluate"]] == [len(x) for x in seen["bound"]] == [50, 20]
    assert all(torch.equal(a, b) for a, b in zip(seen["evaluate"], seen["bound"]))


def test_a_float64_statistician_predicts_takes_prepared_images_and_bounds_as_the_float32_one():
    """fit_predict builds its batch in the networks' type (float64 tensors, bytes, the float32 of
    prepare_images), and test_bound binarises its sets into that type too: a float64 statistician
    answers as the float32 one, in float64, not refusing "the images are torch.float32"."""
    import copy

    from metalearn.data.images import prepare_images

    model = tiny()
    wide = copy.deepcopy(model).double()
    pixels = (grey_images(9, seed=3) * 255).round().to(torch.uint8)  # (9, 1, 28, 28) bytes
    support, labels, query = pixels[:6], [0, 0, 1, 1, 2, 2], pixels[6:]
    expected = model.fit_predict(support, labels, query)
    for given in (support, support.double() / 255, prepare_images(support, 28, 1)):
        queries = query.double() / 255 if given.dtype == torch.float64 else query
        probabilities = wide.fit_predict(given, labels, queries)
        assert probabilities.dtype == torch.float64
        torch.testing.assert_close(probabilities, expected.double(), rtol=1e-4, atol=1e-5)

    class Source:  # grey sets in a floating-point type of one's choice
        def __init__(self, dtype):
            self.dtype = dtype

        def sample(self, size, generator, tasks=None):
            return grey_batch(tasks=size, seed=int(torch.randint(10**6, (1,), generator=generator))).to(self.dtype)

    bound = model.test_bound(Source(torch.float32), 4, chunk=2)
    wide_bound = wide.test_bound(Source(torch.float64), 4, chunk=2)
    assert wide_bound.keys() == bound.keys()
    for key, value in bound.items():
        assert wide_bound[key] == pytest.approx(value, rel=1e-4), key


def test_the_noise_and_the_samples_are_the_same_under_a_float64_default_dtype():
    """set_noise and sample draw float32 whatever torch's default dtype (a float64 default draws
    other numbers from the same generator): a set's noise, and a seed's images, are the same in a
    notebook that set float64."""
    model = tiny(augmented(dilate=0.5, reflect=0.5))
    raw = grey_images(4, 3, seed=1)
    noise = model.set_noise(raw, 7, binarize=True, training=True)
    images = model.sample(raw[0], 3, generator=torch.Generator().manual_seed(0))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        noise64 = model.set_noise(raw, 7, binarize=True, training=True)
        images64 = model.sample(raw[0], 3, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(previous)
    assert noise.keys() == noise64.keys()
    for key in noise:
        assert torch.equal(noise[key], noise64[key]), key
    assert torch.equal(images, images64)


@pytest.mark.parametrize("given", [{"episodes": 0}, {"episodes": -1}, {"episodes": 2.5}, {"chunk": 0},
                                   {"chunk": -4}, {"episodes": True}])
def test_the_test_bound_refuses_a_count_below_one_in_one_line(given):
    """No episode would leave a bound of 0 / 0 (NaN), a chunk of 0 nothing to draw: both refused
    as evaluate refuses them, before any episode is drawn."""
    class Source:
        drawn = []

        def sample(self, size, generator, tasks=None):
            self.drawn.append(size)
            return grey_batch(tasks=size)  # 3 sets an episode

    name, source = next(iter(given)), Source()
    with pytest.raises(MetalearnError, match=f"test_bound: {name} must be a whole number of at least 1, got "):
        tiny().test_bound(source, **given)
    assert source.drawn == []
    bound = tiny().test_bound(source, episodes=3, chunk=2)
    assert source.drawn == [2, 1] and (bound["bound_episodes"], bound["bound_sets"]) == (3, 9)
    assert math.isfinite(bound["bound_nats_per_image"]) and bound["bound_nats_per_image"] < 0


def test_the_default_episodes_are_the_papers_sets_of_5():
    """A set of one image cannot tell the context from the image's latent: unless told
    otherwise the statistician trains on sets of 5 of the vinyals split and tests 1-shot."""
    from metalearn.api import resolve_config

    task = resolve_config("statistician", task={"dataset": "omniglot"}).task
    assert (task.split, task.shots, task.query, task.test_shots, task.test_query) == ("vinyals", 5, 1, 1, 5)
    given = resolve_config("statistician", task={"dataset": "omniglot", "split": "maml", "shots": 2, "query": 3}).task
    assert (given.split, given.shots, given.query, given.test_shots) == ("maml", 2, 3, 1)
    assert resolve_config("maml", task={"dataset": "omniglot"}).task.shots == 1  # other methods as before


# -- runs: resume, two ranks, the command line -------------------------------------------------


def omniglot_args(data_dir, steps: int) -> list:
    return ["statistician", "--dataset", "omniglot", "--split", "vinyals", "--ways", 3, "--shots", 2, "--query", 1,
            "--meta-batch-size", 3, "--steps", steps, "--val-every", 0, "--no-eval", "--no-progress",
            "--checkpoint-every", 2, "--data-dir", data_dir, *TINY_FLAGS]


def test_resume_is_bit_exact(tmp_path, omniglot_data_dir, capsys):
    # augmented: the resume path of a plain run, and the augmentation's draws from each set's generator after it
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = lambda steps: omniglot_args(omniglot_data_dir, steps) + ["--dilate", 0.5, "--reflect", 0.5]  # noqa: E731
    assert run(["train", *args(4), "--run-dir", straight], capsys)[0] == 0
    assert run(["train", *args(2), "--run-dir", resumed], capsys)[0] == 0
    assert run(["train", *args(4), "--run-dir", resumed, "--resume"], capsys)[0] == 0
    assert_same_weights(straight, resumed, atol=0)


@pytest.mark.parametrize("extra", [[], ["--conv-norm", "batch", "--sample-dropout", 0.3, "--dilate", 0.5,
                                        "--reflect", 0.5]],
                         ids=["plain", "batch-norm-sample-dropout-augmented"])
def test_two_gloo_ranks_equal_one_process(tmp_path, omniglot_data_dir, extra):
    # Plain SGD (Adam's first steps are lr * sign(gradient)); shares of 2 and 1 tasks. The
    # noise of a set (its augmentation included) follows its pixels, not the rank; batch-norm
    # statistics are summed over the ranks; only the float32 rounding of convolutions over other
    # batch sizes differs (measured: at most 1e-4 of a tensor's update). A tensor whose gradient
    # is a sum that nearly cancels (the last layer's bias: sigmoid(logit) - pixel over every
    # pixel of every set) keeps that sum's rounding, which scales with its terms, not with the
    # result: its gap is bounded by a thousandth of the largest parameter update (measured on an
    # Intel Xeon: 1.6e-6 for an update of 1.4e-6 there, the largest update 0.015).
    args = [*omniglot_args(omniglot_data_dir, 3), "--meta-optimizer", "sgd", "--meta-lr", 0.01, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "METALEARN_DIST_TIMEOUT": "120"}
    for ranks, folder in ((None, "single"), (2, "double")):
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks else []
        done = subprocess.run([sys.executable, *launcher, "-m", "metalearn", "train", *map(str, args),
                               "--run-dir", str(tmp_path / folder)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    single, double = weights(tmp_path / "single"), weights(tmp_path / "double")
    learner = build_trainer(RunDir(tmp_path / "single").read_config(), data_dir=omniglot_data_dir, lock=False,
                            progress=False).learner  # the initial weights, from the seed
    updates = {name: float((single[name] - start).abs().max()) for name, start in learner.state_dict().items()}
    largest = max(updates[name] for name, _ in learner.named_parameters())
    for name, update in updates.items():  # each tensor's ranks-vs-process gap far below its update
        gap = float((single[name] - double[name]).abs().max())
        assert gap <= 1e-2 * update + 1e-3 * largest, (name, gap, update, largest)


def test_sample_and_plot_from_the_command_line_and_their_errors(tmp_path, omniglot_data_dir, capsys):
    statistician = tmp_path / "statistician"
    assert run(["train", *omniglot_args(omniglot_data_dir, 1), "--run-dir", statistician], capsys)[0] == 0
    folder = tmp_path / "drawings"
    folder.mkdir()
    from metalearn.plotting_samples import plot_image_rows

    for i in range(3):  # a drawing as the user has it: dark strokes on white, 105 x 105
        image = torch.ones(105, 105)
        image[20 + 10 * i: 30 + 10 * i, 20:80] = 0
        from PIL import Image

        Image.fromarray((image * 255).byte().numpy(), mode="L").save(folder / f"{i}.png")
    code, out, err = run(["sample", statistician, "--support", folder, "--num", 4, "--out", tmp_path / "grid.png"],
                         capsys)
    assert code == 0, err
    assert (tmp_path / "grid.png").stat().st_size > 1000 and "grid.png" in out
    # in Python, one folder as a str or a Path, as predict_run takes one query path
    from metalearn.api import sample_run

    for support in (str(folder), folder):
        assert sample_run(statistician, support, num=2, out=tmp_path / "one.png") == tmp_path / "one.png"
    # "~" as a shell would expand it, in the drawings and the grid alike (not a folder named "~")
    from metalearn.errors import MetalearnError

    home = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path)
    try:
        assert sample_run(statistician, "~/drawings", num=2, out="~/home.png") == tmp_path / "home.png"
        assert (tmp_path / "home.png").is_file() and not Path("~").exists()
        with pytest.raises(MetalearnError, match="lies in the support input"):
            sample_run(statistician, "~/drawings", num=2, out=folder / "in-drawings.png")
    finally:
        if home is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = home
    code, out, err = run(["plot", statistician, "--data-dir", omniglot_data_dir], capsys)
    assert code == 0 and (statistician / "plots" / "conditional_samples.png").exists(), err
    assert plot_image_rows  # the grid drawer is public

    not_image = tmp_path / "notes.txt"
    not_image.write_text("not a drawing")
    code, _, err = run(["sample", statistician, "--support", not_image], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not an image" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["sample", statistician, "--support", empty], capsys)
    assert code == 2 and err.count("\n") == 1 and "no image files" in err
    # a grid of 100,000 would take some 19 GB to decode at once, and is no picture: refused
    code, _, err = run(["sample", statistician, "--support", folder, "--num", 100_000, "--out", tmp_path / "big.png"],
                       capsys)
    assert code == 2 and err.count("\n") == 1 and "from 1 to 1000" in err and not (tmp_path / "big.png").exists()
    # the grid written over the run's checkpoint, or among the drawings it reads: refused, nothing written
    before = {p: p.stat().st_mtime_ns for p in [*statistician.rglob("*"), *folder.rglob("*")]}
    for out, says in ((statistician / "checkpoint.png", None), (statistician / "best" / "grid.png", "best checkpoints"),
                      (folder / "grid.png", "the --support input")):
        code, _, err = run(["sample", statistician, "--support", folder, "--out", out], capsys)
        if says is None:  # not one of the run's own names (a .png): written
            assert code == 0, err
            out.unlink()
            continue
        assert code == 2 and err.count("\n") == 1 and says in err and f"--out {out}" in err, err
    assert {p: p.stat().st_mtime_ns for p in [*statistician.rglob("*"), *folder.rglob("*")]} == before
    with pytest.raises(MetalearnError, match="^out .*the support input"):
        sample_run(statistician, folder, out=folder / "grid.png")

    maml = tmp_path / "maml"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2, "--no-eval",
                "--no-progress", "--val-every", 0, "--run-dir", maml], capsys)[0] == 0
    code, _, err = run(["sample", maml, "--support", folder], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot draw new images" in err


def test_a_run_saved_before_conv_norm_and_sample_dropout_keeps_its_networks(tmp_path, omniglot_data_dir, capsys):
    """A run folder from before the options existed (no conv_norm, no sample_dropout in its stored
    configurations) trained the plain networks: it still evaluates and resumes as that run,
    bit for bit, while a new run gets batch norm (MetaLearner.legacy_defaults)."""
    import json

    plain = ["--conv-norm", "none", "--sample-dropout", 0]
    old, straight = tmp_path / "old", tmp_path / "straight"
    assert run(["train", *omniglot_args(omniglot_data_dir, 2), *plain, "--run-dir", old], capsys)[0] == 0
    assert run(["train", *omniglot_args(omniglot_data_dir, 4), *plain, "--run-dir", straight], capsys)[0] == 0
    evaluate = ["eval", old, "--episodes", 4, "--data-dir", omniglot_data_dir, "--no-progress"]
    code, before, err = run(evaluate, capsys)
    assert code == 0, err

    config = json.loads((old / "config.json").read_text())
    for key in ("conv_norm", "sample_dropout"):
        del config["method_config"][key]
    (old / "config.json").write_text(json.dumps(config))
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    for key in ("conv_norm", "sample_dropout"):
        del state["config"]["method_config"][key]
    torch.save(state, old / "checkpoint.pt")
    assert RunDir(old).read_config().method_config["conv_norm"] == "none"

    code, after, err = run(evaluate, capsys)
    assert code == 0, err
    assert after.splitlines()[0] == before.splitlines()[0] and "accuracy" in before  # the score line
    assert run(["train", *omniglot_args(omniglot_data_dir, 4), "--run-dir", old, "--resume"], capsys)[0] == 0
    assert_same_weights(straight, old, atol=0)
    from metalearn.api import resolve_config

    fresh = resolve_config("statistician", {"dataset": "omniglot"}).method_config
    assert fresh["conv_norm"] == "batch" and fresh["sample_dropout"] == 0.2


def test_a_malformed_batch_is_refused_in_one_line_as_by_the_other_methods():
    """meta_loss and predict check the batch as ProtoNets' do (check_task_batch): support and
    query of different task counts gave logits over support x tasks 'classes' without a word."""
    learner = tiny()
    x = binary_images(2, 4)
    labels = torch.tensor([[0, 1, 0, 1]] * 2)
    good = TaskBatch(x, labels, x[:, :2], labels[:, :2], ways=2)
    cases = {
        "fewer query tasks": (TaskBatch(x, labels, x[:1, :2], labels[:1, :2], ways=2),
                              r": the batch.s tensors have different numbers of tasks \(first axis: support_x 2"),
        "int32 labels": (TaskBatch(x, labels.int(), x[:, :2], labels[:, :2], ways=2), r": the batch.s support_y is torch.int32"),
        "no task axis": (TaskBatch(x[0], labels[0], x[0, :2], labels[0, :2], ways=2),
                         r": support_y must be \(tasks, examples\)"),
        "no channel axis": (TaskBatch(x[:, :, 0], labels, x[:, :2, 0], labels[:, :2], ways=2),
                            r" takes sets of 1x28x28 images, shaped \(sets, n, 1, 28, 28\); got \(2, 4, 28, 28\)"),
    }
    for name, (bad, message) in cases.items():
        for call in (learner.meta_loss, learner.predict):
            with pytest.raises(MetalearnError, match=rf"^statistician{message}") as caught:
                call(bad)
            assert "\n" not in str(caught.value), name
    assert learner.predict(good).shape == (2, 2, 2)
