"""Does a trained Neural Statistician's context carry the character? On test episodes: the
spread of q(c | x) (how many context dimensions have a posterior variance below e^-1), and
5-way 1-shot accuracy by D_KL in both directions, by the Euclidean distance between context
means, and by nearest neighbour in pixels.

    python scripts/statistician-context-check.py RUN_DIR [--episodes 60]
"""

from __future__ import annotations

import argparse

import torch

from metalearn.algorithms.statistician import gaussian_kl
from metalearn.checkpoints import load_trained
from metalearn.config import TaskConfig
from metalearn.tasks import build_task_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--episodes", type=int, default=60)
    args = parser.parse_args()
    _, model, step = load_trained(args.run_dir)
    model.eval()
    task = TaskConfig(dataset="omniglot", split="vinyals", ways=5, shots=1, query=5)
    batch = build_task_source(task, "test", None).sample(args.episodes, torch.Generator().manual_seed(3))
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


if __name__ == "__main__":
    main()
