"""MAML's inner loop at the initial weights, before any meta-training: the support and query
losses after 0..k inner steps, averaged over Omniglot training episodes, for MAML's network as
metalearn builds it (``conv4``) and as the authors' code does (``conv4-reference``, batch norm
held in the inner loop), each with alpha 0.1 (the paper's 20-way value on our mean loss) and 2.0
(the same step on the reference code's summed loss). It shows where meta-training starts from
in the 20-way comparison of docs/methods/maml.md of the two networks. Not a timing.

    METALEARN_DATA=/path/to/omniglot python benchmarks/inner_loop_at_init.py --ways 20 --steps 5
"""

from __future__ import annotations

import argparse

import torch
from torch.func import functional_call

from metalearn.algorithms.base import task_loss
from metalearn.algorithms.maml import MAML
from metalearn.config import TaskConfig
from metalearn.models import build_model
from metalearn.tasks import build_task_source

SET_UPS = (  # (model, adapt_norm, alpha)
    ("conv4", True, 0.1),
    ("conv4", True, 2.0),
    ("conv4-reference", False, 0.1),
    ("conv4-reference", False, 2.0),
)


def mean_losses(maml: MAML, batch, steps: int) -> tuple[list[float], list[float]]:
    """Support and query loss after 0..steps inner steps, averaged over the batch's tasks."""
    params = {name: p.detach() for name, p in maml.model.named_parameters()}
    support, query = [], []
    for t in range(batch.num_tasks):
        trajectory = maml.adapt(params, batch.support_x[t], batch.support_y[t], steps)
        support.append([float(task_loss(functional_call(maml.model, p, (batch.support_x[t],)), batch.support_y[t]))
                        for p in trajectory])
        query.append([float(task_loss(functional_call(maml.model, p, (batch.query_x[t],)), batch.query_y[t]))
                      for p in trajectory])
    return torch.tensor(support).mean(0).tolist(), torch.tensor(query).mean(0).tolist()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="inner steps")
    parser.add_argument("--tasks", type=int, default=8, help="training episodes averaged over")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the episodes")
    args = parser.parse_args(argv)
    task = TaskConfig(dataset="omniglot", ways=args.ways, shots=args.shots, query=args.shots)
    batch = build_task_source(task, "train", progress=False).sample(args.tasks,
                                                                   torch.Generator().manual_seed(args.seed))
    print(f"{args.ways}-way {args.shots}-shot, {args.tasks} training episodes, seed {args.seed}: mean loss after "
          f"0..{args.steps} inner steps at the initial weights")
    for model_name, adapt_norm, alpha in SET_UPS:
        torch.manual_seed(args.seed)
        model = build_model(model_name, (1, 28, 28), args.ways)
        maml = MAML(model, MAML.Config(inner_lr=alpha, inner_steps=args.steps, adapt_norm=adapt_norm))
        support, query = mean_losses(maml, batch, args.steps)
        label = f"{model_name}{'' if adapt_norm else ' --no-adapt-norm'}, alpha {alpha}"
        print(f"{label:<44} support {' '.join(f'{x:5.2f}' for x in support)}")
        print(f"{'':<44} query   {' '.join(f'{x:5.2f}' for x in query)}")


if __name__ == "__main__":
    main()
