"""metalearn: meta-learning (MAML and MAML++, PLATIPUS, ProtoNets, Matching Nets, Reptile, the Memory
Module, the Neural Statistician, MAML for RL) on torch.func; ``METHODS`` maps each command-line
name to its class.

Small pieces, one job each::

    from metalearn import MAML, SinusoidTasks, TaskBatch
    from metalearn.models import MLP
"""

import sys

if sys.platform == "win32":  # before the imports below fail on the first POSIX-only module (fcntl)
    raise ImportError("metalearn runs on Linux and macOS: its run folders are locked with POSIX file locks "
                      "(fcntl) and training handles POSIX signals. On Windows, use WSL 2 "
                      "(https://learn.microsoft.com/windows/wsl/install).")

from metalearn.algorithms import (MAML, MAMLRL, METHODS, PLATIPUS, MatchingNet, MemoryModule, MetaLearner,
                                  NeuralStatistician, ProtoNet, Reptile, build_learner, register_method)
from metalearn.aggregate import summarize_runs
from metalearn.api import (evaluate_run, export_results, plot_run, predict_run, resolve_config, run_status,
                           sample_run, train)
from metalearn.config import RunConfig, TaskConfig, TrainConfig
from metalearn.data.images import prepare_images
from metalearn.datasets import register_dataset, register_environment
from metalearn.errors import (ConfigError, MetalearnError, MetalearnWarning, OptionError, OptionWarning,
                              TrainingInterrupted, TrainingStopped)
from metalearn.evaluation import evaluate
from metalearn.runs import RunDir
from metalearn.tasks import EpisodeSampler, Problem, SineOrLineTasks, SinusoidTasks, TaskBatch, build_task_source
from metalearn.checkpoints import load_trained
from metalearn.training import Trainer, build_trainer
from metalearn.uncertainty import compare_learners

__version__ = "0.1.0"

__all__ = [
    "METHODS", "MAML", "PLATIPUS", "ProtoNet", "MatchingNet", "Reptile", "MemoryModule", "NeuralStatistician",
    "MAMLRL", "MetaLearner", "build_learner", "register_method", "register_dataset", "register_environment",
    "evaluate_run", "plot_run", "resolve_config", "train", "RunConfig", "TaskConfig", "TrainConfig",
    "MetalearnError", "evaluate", "EpisodeSampler", "SineOrLineTasks", "SinusoidTasks", "TaskBatch", "Problem",
    "build_task_source", "Trainer", "build_trainer", "load_trained", "RunDir", "predict_run", "prepare_images",
    "export_results", "run_status", "sample_run", "summarize_runs", "compare_learners", "ConfigError", "OptionError",
    "MetalearnWarning", "OptionWarning", "TrainingStopped", "TrainingInterrupted",
]
