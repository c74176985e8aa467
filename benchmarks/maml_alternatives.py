"""Ways to make the second-order MAML meta-step faster that were tried and not kept.

They attack what a profile of the shipped step shows beside the convolutions: about half of a
second-order step (one thread) is element-wise work on the first block's 160 x 64 x 14 x 14
activations, mostly the twice-differentiable batch norm, its derivative and the derivative of
that, each a separate pass over memory. Rows, timed round-robin on ``maml_step.py``'s batch
(Omniglot 5-way 1-shot, 1 query, meta-batch 32, 1 inner step, inner lr 0.4):

  shipped      -- ``MAML.meta_loss(batch).backward()``, as the trainer runs it;
  native-bn    -- the same, with the second-order batch norm replaced by torch's fused
                  batch-norm kernels for the forward pass and the first derivative, and a
                  hand-written second derivative (``NativeBatchNorm`` below; torch's own second
                  derivative of that kernel is wrong under ``vmap``, see
                  ``metalearn/models/norm.py``);
  functional   -- the same meta-gradient as one pure function, ``torch.func.grad`` of the vmapped
                  meta-loss (no outer autograd), eager;
  compiled     -- that function through ``torch.compile(fullgraph=True)`` (inductor fuses the
                  element-wise passes; compile time printed, not in the step time);
  bn-function  -- the twice-differentiable batch norm as a ``torch.autograd.Function``
                  (``ClosedFormBatchNorm`` below) whose backward is the closed-form
                  derivative, written with differentiable operations: fewer passes over memory
                  in the first derivative than autograd derives from ``mean``/``var``, and its
                  second derivative is autograd's of that backward;
  hvp          -- no double backward at all: with one inner step the meta-gradient is
                  mean_i (v_i - alpha H_i v_i), v_i the query gradient at the adapted weights and
                  H_i the support loss's Hessian at the shared ones; the inner and query gradients
                  are taken once with torch's fused batch norm, then H_i v_i forward-over-reverse
                  (``torch.func.jvp`` of ``grad``);
  folded       -- no ``vmap``: the 32 tasks' copies of Conv4 as one network in the layout
                  ``vmap`` itself uses inside (task axis folded into the channels, grouped
                  convolutions, torch's fused batch norm over task x channel, whose second
                  derivative is right outside ``vmap``), differentiated with plain autograd
                  (``folded_meta_gradient`` below; Conv4 with stride only: a second
                  implementation of the network, which is why it would need to win clearly);
  folded-cl    -- the same with the activations in channels-last memory layout, in which a
                  stride-2 convolution's input gradient ran about twice as fast, on one set of
                  weights (docs/performance.md); under ``vmap`` that layout is lost.

The two hand-written derivatives (``native-bn``'s second, ``bn-function``'s first) pass
``torch.autograd.gradcheck`` and ``gradgradcheck`` in float64 before anything is timed.
Every row's meta-gradient is compared with the shipped one before timing (float32; the run
stops above 1e-2 relative: the compiled kernels round differently, ~1e-3 in the first conv's
weight gradient, the size of the per-task loops' float32 error in ``maml_step.py``), the folded
rows' in float64 instead (their float32 rounding reached 5.6e-2 on this batch), and every
row's float32 error against the float64 meta-gradient is printed. First order is not timed: it already runs torch's fused batch norm.

    python benchmarks/maml_alternatives.py --threads 2 --iters 20
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, jvp, vmap

import metalearn.runtime
from metalearn import TaskBatch
from metalearn.models import norm
from maml_step import cpu_description, make_batch, make_model, relative_difference, metalearn_step, warn_if_loaded

SHIPPED_FORWARD = norm.BatchStatNorm.forward


def channel_shape(x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The reduced dimensions of a batch norm over axis 1, and the shape that broadcasts a
    per-channel vector against x."""
    return (0, *range(2, x.dim())), (-1, *([1] * (x.dim() - 2)))


class NativeBatchNorm(torch.autograd.Function):
    """Batch norm on the current batch's statistics with torch's fused kernels; its backward is
    :class:`NativeBatchNormBackward`, so that it can be differentiated a second time."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        return (*NativeBatchNormBackward.apply(grad_y, x, weight, mean, rstd, ctx.eps), None)


class NativeBatchNormBackward(torch.autograd.Function):
    """(g, x, w) -> (dx, dw, db) of batch norm with the fused kernel; its own backward written
    out. With x^ = (x - mean) r, P(h) = h - <h> - x^ <h x^> (<.>: mean over a channel's n
    elements) and cotangents (a, cw, cb) of (dx, dw, db):
      d/dg = w r P(a) + cw x^ + cb
      d/dw = n r (<a g> - <a><g> - <a x^><g x^>)
      d/dx = w r^2 [x^ (<a><g> - <a g> + 3 <a x^><g x^>) - <g x^> P(a) - <a x^> P(g)]
             + cw r P(g)  (expanded below into per-channel coefficients)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, x, weight, mean, rstd, eps):
        return torch.ops.aten.native_batch_norm_backward(grad_y, x, weight, None, None, mean, rstd, True, eps,
                                                         [True, True, True])

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, weight, mean, rstd, _ = inputs
        ctx.save_for_backward(grad_y, x, weight, mean, rstd)

    @staticmethod
    def backward(ctx, a, cw, cb):
        g, x, weight, mean, rstd = ctx.saved_tensors
        dims, shape = channel_shape(x)
        n = x.numel() // x.shape[1]
        r, w = rstd.view(shape), weight.view(shape)
        a = torch.zeros_like(g) if a is None else a
        cw = torch.zeros_like(weight) if cw is None else cw
        cb = torch.zeros_like(weight) if cb is None else cb
        cw, cb = cw.view(shape), cb.view(shape)
        xhat = torch.addcmul(-mean.view(shape) * r, x, r)

        def avg(t):
            return t.sum(dims, keepdim=True) / n

        g_mean, g_xhat, a_mean, a_xhat, ag = avg(g), avg(g * xhat), avg(a), avg(a * xhat), avg(a * g)
        wr = w * r
        wr2 = wr * r
        d_g = torch.addcmul(torch.addcmul(cb - wr * a_mean, xhat, cw - wr * a_xhat), a, wr)
        d_w = (n * r * (ag - a_mean * g_mean - a_xhat * g_xhat)).view(-1)
        coef_xhat = wr2 * (a_mean * g_mean - ag + 3 * a_xhat * g_xhat) - cw * r * g_xhat
        coef_const = wr2 * (g_xhat * a_mean + a_xhat * g_mean) - cw * r * g_mean
        d_x = torch.addcmul(torch.addcmul(torch.addcmul(coef_const, xhat, coef_xhat), a, -wr2 * g_xhat),
                            g, cw * r - wr2 * a_xhat)
        return d_g, d_x, d_w, None, None, None


class ClosedFormBatchNorm(torch.autograd.Function):
    """x -> (y, x^, r): batch norm on the current batch's statistics, y = x^ w + b, x^ = (x - mean) r,
    r = 1 / sqrt(var + eps). x^ and r are outputs so that the backward, written in terms of them
    with differentiable operations, can itself be differentiated: their cotangents come back
    here. With G = g_y w + g_x^ and <.> a channel's mean over its n elements:
      d/dx = r (G - <G> - x^ <G x^>) - (g_r r^2 / n) x^,  d/dw = sum g_y x^,  d/db = sum g_y."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):
        dims, shape = channel_shape(x)
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + eps)
        xhat = (x - mean) * rstd
        return torch.addcmul(bias.view(shape), xhat, weight.view(shape)), xhat, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, xhat, rstd = output
        ctx.save_for_backward(inputs[1], xhat, rstd)

    @staticmethod
    def backward(ctx, grad_y, grad_xhat, grad_rstd):
        weight, xhat, rstd = ctx.saved_tensors
        dims, shape = channel_shape(xhat)
        n = xhat.numel() // xhat.shape[1]
        total = grad_y * weight.view(shape)
        if grad_xhat is not None:
            total = total + grad_xhat
        grad_x = (total - total.mean(dims, keepdim=True)
                  - xhat * (total * xhat).mean(dims, keepdim=True)) * rstd
        if grad_rstd is not None:
            grad_x = grad_x - xhat * (grad_rstd * rstd * rstd / n)
        return grad_x, (grad_y * xhat).sum(dims), grad_y.sum(dims), None


def closed_form_forward(self, x: Tensor) -> Tensor:
    if norm.native_batch_norm_active():  # no gradients, or inside native_batch_norm()
        return SHIPPED_FORWARD(self, x)
    return ClosedFormBatchNorm.apply(x, self.weight, self.bias, self.eps)[0]


def native_forward(self, x: Tensor) -> Tensor:
    if norm.native_batch_norm_active():  # no gradients, or inside native_batch_norm()
        return SHIPPED_FORWARD(self, x)
    return NativeBatchNorm.apply(x, self.weight, self.bias, self.eps)[0]


def decomposed_forward(self, x: Tensor) -> Tensor:
    """The shipped twice-differentiable branch alone (``torch.compile`` cannot trace its
    context-variable switch)."""
    return norm.batch_stat_norm(x, self.weight, self.bias, self.eps)


@contextlib.contextmanager
def batch_norm_forward(forward):
    norm.BatchStatNorm.forward = forward
    try:
        yield
    finally:
        norm.BatchStatNorm.forward = SHIPPED_FORWARD


def functional_meta_gradient(model, inner_lr: float):
    """params, support_x, support_y, query_x, query_y -> meta-gradient dict (second order)."""

    def meta_loss(params, support_x, support_y, query_x, query_y):
        def one_task(sx, sy, qx, qy):
            inner = grad(lambda p: F.cross_entropy(functional_call(model, p, (sx,)), sy))(params)
            adapted = {k: params[k] - inner_lr * inner[k] for k in params}
            return F.cross_entropy(functional_call(model, adapted, (qx,)), qy)

        return vmap(one_task)(support_x, support_y, query_x, query_y).mean()

    return grad(meta_loss)


def hvp_meta_gradient(model, inner_lr: float):
    """The same meta-gradient (one inner step) as v - alpha H v, H v forward-over-reverse."""

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def meta_gradient(params, support_x, support_y, query_x, query_y):
        with torch.no_grad():  # torch.func still differentiates; the fused batch norm (see norm.py)
            inner = vmap(grad(loss), in_dims=(None, 0, 0))(params, support_x, support_y)
            adapted = {k: params[k] - inner_lr * inner[k] for k in params}
            query_grad = vmap(grad(loss))(adapted, query_x, query_y)

            def hessian_vector(v, x, y):
                return jvp(lambda p: grad(loss)(p, x, y), (params,), (v,))[1]

            hv = vmap(hessian_vector)(query_grad, support_x, support_y)
        return {k: (query_grad[k] - inner_lr * hv[k]).mean(0) for k in params}

    return meta_gradient


def folded_meta_gradient(model, inner_lr: float, channels_last: bool):
    """The same meta-gradient (one inner step, second order) in the folded layout, for
    ``Conv4(pooling="stride")`` only: params, support_x, ... -> meta-gradient dict."""
    blocks = len(model.features)

    def forward(params, x):  # params: name -> (tasks, *shape); x: (tasks, n, c, h, w) -> (tasks, n, ways)
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        for i in range(blocks):
            w = params[f"features.{i}.0.weight"]
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None, stride=2, padding=1, groups=tasks)
            h = F.batch_norm(h, None, None, params[f"features.{i}.1.weight"].reshape(-1),
                             params[f"features.{i}.1.bias"].reshape(-1), True, 0.0, model.features[i][1].eps)
            h = F.relu(h)
        features = h.mean(dim=(-2, -1)).view(n, tasks, -1)
        return torch.einsum("ntc,tkc->tnk", features, params["head.weight"]) + params["head.bias"][:, None, :]

    def summed_task_losses(logits, y):  # the sum over tasks of each task's mean cross-entropy
        tasks, n, ways = logits.shape
        return F.cross_entropy(logits.reshape(-1, ways), y.reshape(-1), reduction="sum") / n

    def meta_gradient(params, support_x, support_y, query_x, query_y):
        tasks = support_x.shape[0]
        shared = {k: v.detach().requires_grad_() for k, v in params.items()}
        per_task = {k: v.expand(tasks, *v.shape) for k, v in shared.items()}
        inner = torch.autograd.grad(summed_task_losses(forward(per_task, support_x), support_y),
                                    list(per_task.values()), create_graph=True)
        adapted = {k: v - inner_lr * g for (k, v), g in zip(per_task.items(), inner)}
        query_loss = summed_task_losses(forward(adapted, query_x), query_y) / tasks
        return dict(zip(shared, torch.autograd.grad(query_loss, list(shared.values()))))

    return meta_gradient


def check_folded_in_float64(model, batch, inner_lr: float) -> dict[str, Tensor]:
    """The folded rows compute the shipped meta-gradient: compared in float64, where rounding
    cannot hide a difference. Returns the float64 meta-gradient, to measure every row's float32
    rounding error against."""
    model64 = copy.deepcopy(model).double()
    batch64 = TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y,
                        ways=batch.ways)
    metalearn_step(model64, batch64, first_order=False, inner_lr=inner_lr)()
    reference = {n: q.grad for n, q in model64.named_parameters()}
    params = {k: v.detach() for k, v in model64.named_parameters()}
    for name, channels_last in (("folded", False), ("folded-cl", True)):
        folded = folded_meta_gradient(model64, inner_lr, channels_last)(
            params, batch64.support_x, batch64.support_y, batch64.query_x, batch64.query_y)
        difference = relative_difference(reference, folded)
        print(f"{name}: meta-gradient vs shipped in float64, max relative difference {difference:.1e}")
        if difference > 1e-10:
            raise SystemExit(f"{name} computes a different meta-gradient")
    return reference


def check_hand_written_derivatives() -> None:
    """gradcheck and gradgradcheck, float64, of both hand-written batch-norm derivatives."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=g)
    weight, bias = torch.randn(3, dtype=torch.float64, generator=g), torch.randn(3, dtype=torch.float64, generator=g)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    for name, fn in (("native-bn", NativeBatchNorm), ("bn-function", ClosedFormBatchNorm)):
        def y(x, w, b, fn=fn):
            return fn.apply(x, w, b, 1e-5)[0]
        if not (torch.autograd.gradcheck(y, inputs) and torch.autograd.gradgradcheck(y, inputs)):
            raise SystemExit(f"{name}: derivatives differ from finite differences")
        print(f"{name}: gradcheck and gradgradcheck passed (float64)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile row")
    args = p.parse_args(argv)
    metalearn.runtime.tune_allocator()  # as the metalearn command runs
    if args.threads:
        torch.set_num_threads(args.threads)
    warn_if_loaded(torch.get_num_threads())
    check_hand_written_derivatives()
    batch, inner_lr = make_batch(), 0.4
    model = make_model(batch.ways)
    params = {k: v.detach() for k, v in model.named_parameters()}
    inputs = (params, batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    shipped = metalearn_step(model, batch, first_order=False, inner_lr=inner_lr)

    def autograd_row(forward):
        def step():
            with batch_norm_forward(forward):
                shipped()
            return {n: q.grad for n, q in model.named_parameters()}
        return step

    functional = functional_meta_gradient(model, inner_lr)
    hvp = hvp_meta_gradient(model, inner_lr)

    def functional_row(fn):
        def step():
            with batch_norm_forward(decomposed_forward):
                return fn(*inputs)
        return step

    rows = {"shipped": autograd_row(SHIPPED_FORWARD), "native-bn": autograd_row(native_forward),
            "bn-function": autograd_row(closed_form_forward),
            "functional": functional_row(functional), "hvp": lambda: hvp(*inputs)}
    for name, channels_last in (("folded", False), ("folded-cl", True)):
        rows[name] = functools.partial(folded_meta_gradient(model, inner_lr, channels_last), *inputs)
    if not args.skip_compile:
        compiled = torch.compile(functional, fullgraph=True)
        start = time.perf_counter()
        with batch_norm_forward(decomposed_forward):
            compiled(*inputs)
        print(f"torch.compile: {time.perf_counter() - start:.0f} s to compile", flush=True)
        rows["compiled"] = functional_row(compiled)

    def run(step):
        model.zero_grad(set_to_none=True)
        return {n: g.detach().clone() for n, g in step().items()}

    exact = check_folded_in_float64(model, batch, inner_lr)
    reference = run(rows["shipped"])
    for name, step in rows.items():
        gradient = run(step)
        difference = relative_difference(reference, gradient)
        error = relative_difference(exact, {n: g.double() for n, g in gradient.items()})
        print(f"{name}: meta-gradient vs shipped, max relative difference {difference:.1e}; "
              f"float32 error (vs float64) {error:.1e}")
        if difference > 1e-2 and not name.startswith("folded"):  # folded: checked in float64 above
            raise SystemExit(f"{name} computes a different meta-gradient")
    times = {name: [] for name in rows}
    for i in range(args.warmup + args.iters):
        for name, step in rows.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["shipped"])
    print(f"\nsecond-order meta-step, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{cpu_description()}, median of {args.iters}\n")
    print("| row | ms/step | vs shipped |\n| --- | ---: | ---: |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {base / statistics.median(ts):.2f}x |")


if __name__ == "__main__":
    main()
