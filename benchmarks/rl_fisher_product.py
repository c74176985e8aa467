"""Three ways to compute TRPO's Fisher-vector product through MAML's inner step, timed on
nav2d's meta-batch at the paper's settings (20 tasks x 20 trajectories x 100 steps, one
policy-gradient inner step), each checked against the shipped one:

  pearlmutter -- what ``maml_rl.kl_hessian_vector`` does: the KL's gradient built once with its
                 graph, each product one more backward pass through it (double backward);
  jvp(grad)   -- forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad`` of the KL,
                 everything recomputed per product;
  linearize   -- ``torch.func.linearize`` of the KL's gradient, traced once, each product a
                 replay of the traced tangent computation.

    python benchmarks/rl_fisher_product.py --threads 1 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.func import grad, jvp, linearize

from metalearn.algorithms.maml_rl import MAMLRL, GaussianMLPPolicy, flat, kl_hessian_vector, unflat
from metalearn.envs import MDPTasks
from metalearn.envs.nav2d import Nav2D

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_step import cpu_description  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="products timed per way (mean)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    learner = MAMLRL(GaussianMLPPolicy(2, 2), MAMLRL.Config())
    meta = learner.meta_objective(MDPTasks(Nav2D()).sample(20, torch.Generator().manual_seed(0)))
    theta = {k: v.detach().clone().requires_grad_() for k, v in learner.policy.named_parameters()}
    leaves = list(theta.values())
    vector = torch.randn(sum(p.numel() for p in leaves), generator=torch.Generator().manual_seed(1))
    result = {"torch": torch.__version__, "threads": args.threads, "cpu": cpu_description(),
              "parameters": vector.numel()}

    def timed(name, product, setup_s=0.0):
        start = time.perf_counter()
        for _ in range(args.repeats):
            value = product(vector)
        result[name] = {"setup_s": setup_s, "product_s": (time.perf_counter() - start) / args.repeats}
        return value

    start = time.perf_counter()
    _, kl = meta.objective(theta)
    pearlmutter = kl_hessian_vector(kl, leaves)
    reference = timed("pearlmutter", pearlmutter, time.perf_counter() - start)

    def kl_of(flat_theta):
        return meta.objective(unflat(flat_theta, theta))[1]

    x, kl_grad = flat(leaves).detach(), grad(kl_of)
    products = {"jvp(grad)": timed("jvp(grad)", lambda v: jvp(kl_grad, (x,), (v,))[1])}
    start = time.perf_counter()
    with warnings.catch_warnings():  # torch.fx's constant folding warns about its own graph
        warnings.simplefilter("ignore")
        _, replay = linearize(kl_grad, x)
    products["linearize"] = timed("linearize", replay, time.perf_counter() - start)
    for name, value in products.items():
        result[name]["max_relative_difference"] = float((value - reference).abs().max() / reference.abs().max())
    for name in ("pearlmutter", "jvp(grad)", "linearize"):
        row = result[name]
        print(f"{name:12s} setup {row['setup_s']:.2f} s, {row['product_s']:.3f} s a product"
              + (f", {row['max_relative_difference']:.1e} from pearlmutter's" if name != "pearlmutter" else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
