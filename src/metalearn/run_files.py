"""The names of the files in a run folder: the one place that states them.

:class:`metalearn.runs.RunDir` reads and writes these files (its module docstring says what each
holds); the modules that must recognise a run folder or its files without reading it (a run's
recorded split among split files, an output that would overwrite a run's file) take the names
from here, so that a renamed file cannot leave one of them looking for the old name.
"""

from __future__ import annotations

CONFIG_NAME = "config.json"  # every knob of the run (RunConfig)
CHECKPOINT_NAME = "checkpoint.pt"  # the latest checkpoint
METRICS_NAME = "metrics.jsonl"  # one JSON object per logged step
EVAL_NAME = "eval.json"  # the run's own test evaluation
EVAL_PATTERN = "eval*.json"  # every evaluation: eval.json and eval-<what differs>.json
RUN_SPLIT_NAME = "split.json"  # a run's record of its class folders' split (a --split-file)
PLOTS_NAME = "plots"  # the folder of the PNGs of metalearn plot and sample
BEST_NAME = "best"  # the folder of the checkpoints --keep-best kept
BEST_INDEX_NAME = "index.json"  # in best/: the file name of each kept checkpoint and its score
LOCK_NAME = ".lock"  # present while a training process holds the folder

# any of these says that a folder holds (or held) a run of its own
RUN_MARKERS = (CONFIG_NAME, CHECKPOINT_NAME, METRICS_NAME)
# what only the process holding a run folder's lock writes: a temporary file of these is never
# a live write of someone else's
WRITER_FILES = (*RUN_MARKERS, RUN_SPLIT_NAME)
# a run folder's own files, which its loading, resuming and record read (besides its
# evaluations, EVAL_PATTERN): an output of a command never takes one of these names there
RUN_OWN_FILES = (*WRITER_FILES, LOCK_NAME)
