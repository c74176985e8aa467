"""Sinusoid (MAML 5.1) and sinusoid-or-line (PLATIPUS) regression tasks."""

from __future__ import annotations

import math

import pytest
import torch

from batches import assert_batches_equal, gen
from metalearn.errors import MetalearnError
from metalearn.tasks.sinusoid import SineOrLineTasks, SinusoidTasks


def joined(batch):
    """x, y of support and query together: (tasks, shots+query, 1)."""
    return torch.cat([batch.support_x, batch.query_x], 1), torch.cat([batch.support_y, batch.query_y], 1)


def test_sinusoid_shapes():
    batch = SinusoidTasks(shots=5, query=10).sample(7, gen(0))
    assert batch.support_x.shape == batch.support_y.shape == (7, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (7, 10, 1)
    assert batch.support_x.dtype == batch.support_y.dtype == torch.float32
    assert batch.ways == 0 and not batch.is_classification
    assert set(batch.task_params) == {"amplitude", "phase"}
    assert all(v.shape == (7,) for v in batch.task_params.values())


def test_sinusoid_ranges_and_exact_function():
    batch = SinusoidTasks(shots=5, query=10).sample(2000, gen(1))
    amplitude, phase = batch.task_params["amplitude"], batch.task_params["phase"]
    x, y = joined(batch)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    assert -5.0 <= x.min() and x.max() <= 5.0
    # noiseless: y = A sin(x - phase), per task
    truth = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
    torch.testing.assert_close(y, truth, rtol=0, atol=1e-6)
    # spot check one point in double precision, away from the tensor formula
    t, i = 17, 3
    a, p, xi = float(amplitude[t]), float(phase[t]), float(x[t, i, 0])
    assert float(y[t, i, 0]) == pytest.approx(a * math.sin(xi - p), abs=1e-5)


def test_sinusoid_statistics_over_many_tasks():
    batch = SinusoidTasks(shots=10, query=10).sample(20000, gen(2))
    amplitude, phase = batch.task_params["amplitude"], batch.task_params["phase"]
    x, _ = joined(batch)
    assert amplitude.mean().item() == pytest.approx(2.55, abs=0.04)  # U[0.1, 5]: 2.55
    assert amplitude.std().item() == pytest.approx(4.9 / math.sqrt(12), abs=0.03)
    assert phase.mean().item() == pytest.approx(math.pi / 2, abs=0.03)
    assert x.mean().item() == pytest.approx(0.0, abs=0.02)
    assert x.std().item() == pytest.approx(10 / math.sqrt(12), abs=0.02)
    # support and query points are drawn alike (both uniform on [-5, 5])
    assert batch.query_x.abs().mean().item() == pytest.approx(2.5, abs=0.03)
    assert batch.support_x.abs().mean().item() == pytest.approx(2.5, abs=0.03)


def test_sinusoid_noise_option():
    tasks = SinusoidTasks(noise_std=0.5)
    batch = tasks.sample(5000, gen(3))
    x, y = joined(batch)
    residual = y - tasks.function(batch.task_params, x)
    assert residual.std().item() == pytest.approx(0.5, abs=0.01)


def test_sinusoid_custom_ranges():
    batch = SinusoidTasks(amplitude=(1.0, 1.0), phase=(0.0, 0.0), x_range=(0.0, 1.0)).sample(50, gen(4))
    x, y = joined(batch)
    assert (x >= 0).all() and (x <= 1).all()
    torch.testing.assert_close(y, torch.sin(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [SinusoidTasks, SineOrLineTasks])
def test_seeding_and_task_slices(cls):
    tasks = cls(shots=5, query=10)
    assert_batches_equal(tasks.sample(8, gen(5)), tasks.sample(8, gen(5)))
    other = tasks.sample(8, gen(6))
    assert not torch.equal(other.support_x, tasks.sample(8, gen(5)).support_x)
    g_full, g_part = gen(7), gen(7)
    full = tasks.sample(8, g_full)
    part = tasks.sample(8, g_part, tasks=slice(2, 6))
    assert part.num_tasks == 4
    assert_batches_equal(part, full.select(slice(2, 6)))
    assert_batches_equal(tasks.sample(8, g_full), tasks.sample(8, g_part))  # still in step


@pytest.mark.parametrize("cls", [SinusoidTasks, SineOrLineTasks])
@pytest.mark.parametrize("shots, query", [(0, 10), (5, 0)])
def test_no_shots_or_no_query(cls, shots, query):
    with pytest.raises(MetalearnError, match=f"at least 1, got {shots} and {query}"):
        cls(shots=shots, query=query)


def test_sine_or_line_shapes_and_params():
    batch = SineOrLineTasks(shots=5, query=10).sample(6, gen(8))
    assert batch.support_x.shape == batch.support_y.shape == (6, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (6, 10, 1)
    assert set(batch.task_params) == {"is_line", "amplitude", "phase", "slope", "intercept"}
    assert all(v.shape == (6,) for v in batch.task_params.values())


def test_sine_or_line_mixture_and_noise():
    tasks = SineOrLineTasks(shots=10, query=10)
    batch = tasks.sample(20000, gen(9))
    params = batch.task_params
    x, y = joined(batch)
    is_line = params["is_line"].bool()
    assert set(params["is_line"].unique().tolist()) <= {0.0, 1.0}
    assert is_line.float().mean().item() == pytest.approx(0.5, abs=0.02)
    for key in ("slope", "intercept"):
        assert -3.0 <= params[key].min() and params[key].max() <= 3.0
        assert params[key].mean().item() == pytest.approx(0.0, abs=0.05)
    assert 0.1 <= params["amplitude"].min() and params["amplitude"].max() <= 5.0
    assert 0.0 <= params["phase"].min() and params["phase"].max() <= math.pi
    assert -5.0 <= x.min() and x.max() <= 5.0

    # noise around the true function, computed here independently per kind of task
    line = params["slope"][:, None, None] * x + params["intercept"][:, None, None]
    sine = params["amplitude"][:, None, None] * torch.sin(x - params["phase"][:, None, None])
    noise = y - torch.where(is_line[:, None, None], line, sine)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.std().item() == pytest.approx(0.3, abs=0.01)
    assert noise[is_line].std().item() == pytest.approx(0.3, abs=0.01)
    assert noise[~is_line].std().item() == pytest.approx(0.3, abs=0.01)
    torch.testing.assert_close(tasks.function(params, x), torch.where(is_line[:, None, None], line, sine),
                               rtol=0, atol=1e-5)
    # the line tasks really are lines: y - noise is affine in x
    # the line tasks really are lines: a least-squares line through the noisy points recovers
    # slope and intercept, leaving residuals of the noise's size (unlike a sinusoid task)
    design = torch.cat([x, torch.ones_like(x)], 2).double()  # (tasks, n, 2)
    fit = torch.linalg.lstsq(design, y.double()).solution[..., 0]  # (tasks, 2)
    residual = (y.double() - design @ fit[..., None]).pow(2).mean((1, 2)).sqrt()
    torch.testing.assert_close(fit[is_line, 0], params["slope"][is_line].double(), rtol=0, atol=0.15)
    torch.testing.assert_close(fit[is_line, 1], params["intercept"][is_line].double(), rtol=0, atol=0.6)
    assert residual[is_line].mean().item() == pytest.approx(0.3 * math.sqrt(18 / 20), abs=0.01)
    assert residual[~is_line].mean().item() > 1.0


def test_sine_or_line_without_noise_is_exact():
    tasks = SineOrLineTasks(noise_std=0.0)
    batch = tasks.sample(500, gen(10))
    x, y = joined(batch)
    torch.testing.assert_close(y, tasks.function(batch.task_params, x), rtol=0, atol=0)


def recomputed(cls, shots, query, noise_std, num_tasks, seed):
    """The tasks as ``cls`` draws them in float32, recomputed here from the generator's draws in
    their order (uniforms scaled to the default bounds, then the standard normal noise)."""
    g = gen(seed)
    n = shots + query

    def uniform(shape, low, high):
        return torch.rand(shape, generator=g, dtype=torch.float32) * (high - low) + low

    lines = cls is SineOrLineTasks
    is_line = (torch.rand(num_tasks, generator=g, dtype=torch.float32) < 0.5).float() if lines else None
    amplitude, phase = uniform(num_tasks, 0.1, 5.0), uniform(num_tasks, 0.0, math.pi)
    slope, intercept = (uniform(num_tasks, -3.0, 3.0), uniform(num_tasks, -3.0, 3.0)) if is_line is not None else (0, 0)
    x = uniform((num_tasks, n, 1), -5.0, 5.0)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32) * noise_std
    y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
    if is_line is not None:
        mask = is_line[:, None, None]
        y = mask * (slope[:, None, None] * x + intercept[:, None, None]) + (1 - mask) * y
    return x, y + noise


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls, noise_std", [(SinusoidTasks, 0.0), (SinusoidTasks, 0.5), (SineOrLineTasks, 0.3)])
def test_a_seeded_float32_source_draws_what_the_draws_recomputed_give_whatever_the_default_dtype(cls, noise_std,
                                                                                                  default):
    """float32 (the default dtype of the source): bit for bit the generator's float32 draws, in
    their order, under torch's float32 default and a notebook's float64 one alike."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        batch = cls(shots=3, query=4, noise_std=noise_std).sample(6, gen(11))
    finally:
        torch.set_default_dtype(previous)
    x, y = recomputed(cls, 3, 4, noise_std, 6, 11)
    got_x, got_y = joined(batch)
    assert got_x.dtype == got_y.dtype == torch.float32
    assert torch.equal(got_x, x) and torch.equal(got_y, y)


def test_a_seeded_sinusoid_draw_is_pinned():
    """The first task of seed 0 (x, y of its first support point and its amplitude), as drawn in float32."""
    batch = SinusoidTasks().sample(2, gen(0))
    pinned = (batch.task_params["amplitude"][0].item(), batch.support_x[0, 0, 0].item(),
              batch.support_y[0, 0, 0].item())
    assert pinned == (2.5316572189331055, -1.925771713256836, -2.041261672973633)


@pytest.mark.parametrize("cls, noise_std", [(SinusoidTasks, 0.0), (SinusoidTasks, 0.5), (SineOrLineTasks, 0.3)])
def test_a_float64_source_draws_the_float32_tasks_cast_and_computes_its_targets_in_float64(cls, noise_std):
    wide = cls(shots=3, query=4, noise_std=noise_std, dtype=torch.float64)
    assert wide.dtype == torch.float64 and cls().dtype == torch.float32
    batch, narrow = wide.sample(50, gen(12)), cls(shots=3, query=4, noise_std=noise_std).sample(50, gen(12))
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert getattr(batch, name).dtype == torch.float64, name
    assert set(batch.task_params) == set(narrow.task_params)
    for name, value in batch.task_params.items():  # the same random draws, cast
        assert value.dtype == torch.float64 and torch.equal(value, narrow.task_params[name].double()), name
    x, y = joined(batch)
    x32, y32 = joined(narrow)
    assert torch.equal(x, x32.double())
    noise = (y32 - cls.function(narrow.task_params, x32)).double() if noise_std else 0  # the float32 noise, to 1e-6
    torch.testing.assert_close(y, cls.function(batch.task_params, x) + noise, rtol=0, atol=1e-5)
    if not noise_std:  # the targets computed in float64 from the float64 parameters and points
        params = batch.task_params
        truth = torch.tensor([[a * math.sin(xi - p) for xi in row] for a, p, row in
                              zip(params["amplitude"].tolist(), params["phase"].tolist(), x[..., 0].tolist())],
                             dtype=torch.float64)
        torch.testing.assert_close(y[..., 0], truth, rtol=0, atol=1e-12)
        assert (y - y32.double()).abs().max() > 1e-9  # not the float32 targets cast


@pytest.mark.parametrize("cls", [SinusoidTasks, SineOrLineTasks])
@pytest.mark.parametrize("dtype", [torch.long, torch.bool, "float64"])
def test_a_dtype_that_is_no_floating_point_type_is_refused(cls, dtype):
    with pytest.raises(MetalearnError, match=rf"^{cls.__name__} draws inputs and targets as floats: dtype must be a "
                                             rf"floating-point type, got {dtype!r}$"):
        cls(dtype=dtype)
