"""Named Omniglot splits: which (character, rotation) classes belong to train, val and test.

- ``vinyals``: the standard few-shot split (Vinyals et al. 2016, files from Snell et al. 2017):
  1028 / 172 / 423 characters, each rotated by 0/90/180/270 degrees into four classes.
- ``vinyals-trainval``: the papers' final training on the ``vinyals`` split (Prototypical
  Networks, Matching Networks, Learning to Remember Rare Events; Snell et al.'s
  ``trainval.txt``): its train and val parts together, 1200 characters (4800 classes), tested
  on the same 423 (1692); it has no validation part, since its validation classes are trained on.
- ``lake``: the release's own background (964) vs evaluation (659) characters, unrotated; it
  has no validation part.
- ``maml``: the MAML reference code's sizes and rotations: a seeded shuffle of all 1623
  characters into 1100 train / 100 val / 423 test, with a rotation drawn afresh per class per
  task (our own shuffle, NumPy seed 1, so the members differ from the reference code's).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import Tensor

from metalearn.data.omniglot import Omniglot
from metalearn.errors import MetalearnError
from metalearn import run_files

# the order of the "valid splits" message and of `metalearn data info`: a new split goes at the end, so
# the existing ones keep their place in both
SPLITS = ("vinyals", "lake", "maml", "vinyals-trainval")
PARTS = ("train", "val", "test")
RUN_SPLIT_NAME = run_files.RUN_SPLIT_NAME  # importable from here as before; stated in metalearn.run_files
RANDOM_ROTATION = -1
# (split of a run's starting weights, split of the run): how many characters the run is scored
# on that the first saw, its training characters among the run's validation and test ones and
# its validation characters (which chose its weights) among the run's test ones, counted on the
# release's pools (tests/test_omniglot.py recounts them); a pair not listed shares none
SHARED_CHARACTERS = {
    ("vinyals", "lake"): 236, ("vinyals", "maml"): 366,
    ("lake", "vinyals"): 172, ("lake", "maml"): 304,
    ("maml", "vinyals"): 411, ("maml", "lake"): 474, ("maml", "vinyals-trainval"): 295,
    ("vinyals-trainval", "vinyals"): 172, ("vinyals-trainval", "lake"): 236, ("vinyals-trainval", "maml"): 376,
}

MAML_SPLIT_SEED = 1
MAML_SPLIT_SIZES = (1100, 100, 423)


@dataclass(frozen=True)
class ClassPool:
    """The classes of one split part.

    characters: (n_classes,) long, index into the Omniglot array
    rotations:  (n_classes,) long, quarter turns 0..3, or -1 for "draw one per task"
    """

    name: str
    characters: Tensor
    rotations: Tensor

    def __len__(self) -> int:
        return int(self.characters.shape[0])

    @property
    def num_characters(self) -> int:
        return int(torch.unique(self.characters).numel())


def omniglot_split(omniglot: Omniglot, split: str, part: str) -> ClassPool:
    """The class pool of ``part`` (train/val/test) of the named ``split``."""
    if split not in SPLITS:
        raise MetalearnError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if part not in PARTS:
        raise MetalearnError(f"unknown split part {part!r}; valid parts: {', '.join(PARTS)}")
    name = f"{split}/{part}"
    if split == "vinyals":
        return _vinyals(omniglot, part, name)
    if split == "vinyals-trainval":
        if part == "val":
            raise MetalearnError("the vinyals-trainval split has no validation part: it trains on the vinyals "
                                 "validation classes (choose the training length on vinyals)")
        if part == "test":
            return _vinyals(omniglot, "test", name)
        # the union is built from vinyals' own lists, so the two splits cannot drift apart
        train, val = _vinyals(omniglot, "train", name), _vinyals(omniglot, "val", name)
        return ClassPool(name, torch.cat([train.characters, val.characters]),
                         torch.cat([train.rotations, val.rotations]))
    if split == "lake":
        if part == "val":
            raise MetalearnError("the lake split has no validation part (use vinyals or maml)")
        characters = np.flatnonzero(omniglot.background == (part == "train"))
        return ClassPool(name, torch.as_tensor(characters), torch.zeros(len(characters), dtype=torch.long))
    order = np.random.RandomState(MAML_SPLIT_SEED).permutation(len(omniglot.names))
    n_train, n_val, _ = MAML_SPLIT_SIZES
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, None)}
    start, stop = bounds[part]
    characters = torch.as_tensor(order[start:stop])
    return ClassPool(name, characters, torch.full_like(characters, RANDOM_ROTATION))


def has_part(split: str, part: str) -> bool:
    """Whether ``split`` has ``part``: lake and vinyals-trainval have no validation part."""
    return not (split in ("lake", "vinyals-trainval") and part == "val")


def _vinyals(omniglot: Omniglot, part: str, name: str) -> ClassPool:
    text = resources.files("metalearn.data").joinpath(f"splits/vinyals/{part}.txt").read_text()
    index = omniglot.index_of()
    characters, rotations = [], []
    for line in text.split():
        character, rotation = line.rsplit("/", 1)
        if character not in index:
            raise MetalearnError(f"the vinyals split names {character}, which the data lacks")
        characters.append(index[character])
        rotations.append(int(rotation.removeprefix("rot")) // 90)
    return ClassPool(name, torch.tensor(characters), torch.tensor(rotations))
