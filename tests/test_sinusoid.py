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
