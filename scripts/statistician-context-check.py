"""Does a trained Neural Statistician's context carry the character? On test episodes: the
spread of q(c | x) (how many context dimensions have a posterior variance below e^-1), and
5-way 1-shot accuracy by D_KL in both directions, by the Euclidean distance between context
means, and by nearest neighbour in pixels; then, on 5-way episodes of five support and five
query images per class, D_KL(q(c|D_i) || q(c|Q)) where the query Q is one image, or all five
query images of a class as one set (the sets of five the model trains on).

    python scripts/statistician-context-check.py RUN_DIR [--episodes 60] [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from metalearn.algorithms.statistician import gaussian_kl
from metalearn.checkpoints import load_trained
from metalearn.config import TaskConfig
from metalearn.tasks import build_task_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="another checkpoint of the run, e.g. RUN_DIR/best/step-700.pt (default: the latest)")
    args = parser.parse_args()
    _, model, step = load_trained(args.run_dir, checkpoint=args.checkpoint)
    model.eval()
    task = TaskConfig(dataset="omniglot", split="vinyals", ways=5, shots=1, query=5)
    batch = build_task_source(task, "test").sample(args.episodes, torch.Generator().manual_seed(3))
    tasks, ways, queries = args.episodes, 5, 25
    with torch.no_grad():
        mean_s, logvar_s = model.context(model.support_sets(batch))
        mean_q, logvar_q = model.context(batch.query_x.flatten(0, 1).unsqueeze(1))
    mean_s, logvar_s = mean_s.view(tasks, ways, 1, -1), logvar_s.view(tasks, ways, 1, -1)
    mean_q, logvar_q = mean_q.view(tasks, 1, queries, -1), logvar_q.view(tasks, 1, queries, -1)

    def accuracy(score: torch.Tensor) -> float:
        return 100 * float((score.argmax(1) == batch.query_y).float().mean())

    active = int((logvar_q.mean((0, 1, 2)) < -1).sum())
    pixels = -(batch.support_x.view(tasks, ways, 1, -1) - batch.query_x.view(tasks, 1, queries, -1)).square().sum(-1)
    print(f"step {step}, {args.episodes} test episodes, 5-way 1-shot")
    print(f"context dimensions with posterior variance below e^-1: {active} of {mean_q.shape[-1]}")
    print(f"D_KL(q(c|D_i) || q(c|x)): {accuracy(-gaussian_kl(mean_s, logvar_s, mean_q, logvar_q)):.1f}%")
    print(f"D_KL(q(c|x) || q(c|D_i)): {accuracy(-gaussian_kl(mean_q, logvar_q, mean_s, logvar_s)):.1f}%")
    print(f"Euclidean between context means: {accuracy(-(mean_s - mean_q).square().sum(-1)):.1f}%")
    print(f"nearest neighbour in pixels: {accuracy(pixels):.1f}%")

    task = TaskConfig(dataset="omniglot", split="vinyals", ways=5, shots=5, query=5)
    batch = build_task_source(task, "test").sample(args.episodes, torch.Generator().manual_seed(4))
    order = batch.query_y.argsort(dim=1, stable=True)  # each class's queries together, in label order
    queries = torch.take_along_dim(batch.query_x, order.view(*order.shape, 1, 1, 1), dim=1)
    with torch.no_grad():
        mean_s, logvar_s = (t.view(tasks, ways, 1, -1) for t in model.context(model.support_sets(batch)))
        single = [t.view(tasks, 1, ways * 5, -1) for t in model.context(queries.flatten(0, 1).unsqueeze(1))]
        whole = [t.view(tasks, 1, ways, -1) for t in model.context(queries.reshape(tasks * ways, 5, *queries.shape[2:]))]
    kl_single = -gaussian_kl(mean_s, logvar_s, *single)  # (tasks, ways, 25)
    kl_sets = -gaussian_kl(mean_s, logvar_s, *whole)  # (tasks, ways, ways): query set j against class i
    print(f"5-shot supports, one query image: {100 * float((kl_single.argmax(1) == batch.query_y.sort(1).values).float().mean()):.1f}%")
    print(f"5-shot supports, query sets of 5: {100 * float((kl_sets.argmax(1) == torch.arange(ways)).float().mean()):.1f}%")


if __name__ == "__main__":
    main()
