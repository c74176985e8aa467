"""metalearn: meta-learning (MAML, PLATIPUS, ProtoNets, Matching Nets, Reptile) on torch.func.

Small pieces, one job each::

    from metalearn import MAML, SinusoidTasks, TaskBatch
    from metalearn.models import MLP
"""

from metalearn.algorithms import ALGORITHMS, MAML, MetaLearner, build_learner
from metalearn.api import evaluate_run, plot_run, resolve_config, train
from metalearn.config import RunConfig, TaskConfig, TrainConfig
from metalearn.errors import MetalearnError
from metalearn.evaluation import evaluate
from metalearn.tasks import EpisodeSampler, SineOrLineTasks, SinusoidTasks, TaskBatch, build_task_source
from metalearn.training import Trainer, build_trainer, load_trained

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "MAML", "MetaLearner", "build_learner", "evaluate_run", "plot_run", "resolve_config",
    "train", "RunConfig", "TaskConfig", "TrainConfig", "MetalearnError", "evaluate", "EpisodeSampler",
    "SineOrLineTasks", "SinusoidTasks", "TaskBatch", "build_task_source", "Trainer", "build_trainer",
    "load_trained",
]
