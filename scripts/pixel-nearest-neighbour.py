"""The pixel-space nearest-neighbour baseline on a run's test episodes: each query image takes
the class of the support image nearest to it in squared pixel distance (the prepared images,
as the methods see them), on exactly the episodes `metalearn eval RUN_DIR` scores (the run's
split and test shape, or ``--ways`` / ``--shots``; seed 0 with the test part's offset). Prints
the accuracy with its 95% interval, as `metalearn eval` does.

    python scripts/pixel-nearest-neighbour.py RUN_DIR [--ways 20] [--shots 5] [--episodes 1000]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from metalearn.datasets import get_dataset
from metalearn.errors import MetalearnError
from metalearn.evaluation import evaluate
from metalearn.evaluation_setup import with_split, with_test_shape
from metalearn.runs import RunDir
from metalearn.tasks import build_task_source
from metalearn.training import part_seed_offset


class PixelNearestNeighbour(nn.Module):
    """A learner that only predicts: minus the distance to the nearest support image of each
    class, ``(tasks, n_query, ways)``."""

    def predict(self, batch) -> torch.Tensor:
        distances = torch.cdist(batch.query_x.flatten(2), batch.support_x.flatten(2)).square()  # (tasks, q, s)
        nearest = torch.full((*distances.shape[:2], batch.ways), float("inf"), dtype=distances.dtype)
        index = batch.support_y[:, None, :].expand_as(distances)
        return -nearest.scatter_reduce(2, index, distances, reduce="amin")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--ways", type=int, default=None)
    parser.add_argument("--shots", type=int, default=None)
    parser.add_argument("--episodes", type=int, default=None, help="default: the run's --eval-episodes")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    for name in ("ways", "shots", "episodes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} takes 1 or more, got {value}")
    try:
        config, _ = with_split(RunDir(args.run_dir).read_config(), run_dir=args.run_dir,  # class folders: its split.json
                               data_dir=args.data_dir)
        if not get_dataset(config.task.dataset).classification:
            parser.error(f"{args.run_dir}: a run on {config.task.dataset}, not image classification: "
                         "the pixel nearest neighbour classifies images")
        shape = {key: value for key, value in (("ways", args.ways), ("shots", args.shots)) if value is not None}
        if shape:
            config = with_test_shape(config, shape)
        source = build_task_source(config.task, "test", data_dir=args.data_dir, progress=False, evaluation=True)
        episodes = args.episodes if args.episodes is not None else config.train.eval_episodes
        result = evaluate(PixelNearestNeighbour(), source, episodes, seed=part_seed_offset("test"), per_step=False)
    except MetalearnError as err:
        parser.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
    test = config.task.for_testing()
    print(f"pixel nearest neighbour, {test.ways}-way {test.shots}-shot, {result['episodes']} test episodes: "
          f"{result['mean']:.2f} +/- {result['ci95']:.2f}")

if __name__ == "__main__":
    main()
