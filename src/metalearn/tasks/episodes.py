"""N-way K-shot episodes drawn straight from a cached uint8 image tensor, or from examples of
any shape with their labels (:meth:`EpisodeSampler.from_labels`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.config import EVALUATION_SHAPE, TEST_SHAPE_COMMANDS, augment_parts
from metalearn.data.images import to_float
from metalearn.data.splits import ClassPool
from metalearn.errors import MetalearnError, OptionError, flag, kind_of
from metalearn.tasks.batch import TaskBatch, check_draw, check_dtype, check_whole


class EpisodeSampler:
    """Draws batches of N-way K-shot classification tasks.

    Each task picks ``ways`` distinct classes of the pool in random order (so the label of a
    class is re-drawn every episode), then ``shots + query`` distinct images of each: ``shots``
    for the support set, ``query`` for the query set. A class whose rotation is -1 gets a random
    quarter turn per task. Everything is drawn from the given ``torch.Generator``, so a seed
    gives the same episodes on any run. ``dataset``: the images' name in messages and, for a
    sampler of one's own, in the task source a run of it records (default "your data").

    ``images``: uint8 pixels, one of
      - ``(classes, examples, H, W)``: one grey channel (Omniglot, strokes bright);
      - ``(classes, examples, C, H, W)``;
      - ``(n_images, C, H, W)`` with ``class_sizes`` ``(classes,)``: the images of each class
        follow those of the class before (an image folder, any number of images per class).
    ``pool``: a :class:`~metalearn.data.splits.ClassPool`, whose ``characters`` index the classes
    (``omniglot_split(...)`` gives a split part's; ``ClassPool("mine", torch.arange(n),
    torch.zeros(n, dtype=torch.long))`` classes 0..n-1 unrotated). ``test``: None (the default,
    a sampler of one's own) reports a shape the classes cannot have by these arguments
    (``ways=700``); True and False are for the samplers ``build_task_source`` builds of a run's
    test or validation episodes (True) or training episodes (False), which report it with the
    options that set it, as the caller spells them (an :class:`~metalearn.errors.OptionError`):
    the ``TaskConfig`` fields from Python (``test_ways=700``, ``ways``), their flags on the command
    line (``--test-ways 700``, ``--ways``); ``ways_follow``: a test sampler's ways are the
    training ones (``TaskConfig.test_ways`` unset), which such a refusal adds. ``evaluation``
    (with ``test`` True): the test episodes of an evaluation, whose shape ``evaluate_run``'s
    ``episode_shape`` sets (``metalearn eval``'s and ``compare``'s ``--ways``, ``--shots``,
    ``--query``; they have no ``--test-*``): a refusal names those. ``dtype``: the
    floating-point type of the images drawn (float64 for a float64 model).

    The pool's images are rotated once, up front, into a bank of every (class, rotation) the
    pool can produce (at 28x28 about 64 MB for the largest Omniglot split part), so drawing a
    batch is one ``index_select`` and one conversion to float (:func:`metalearn.data.images.to_float`,
    the conversion :func:`~metalearn.data.images.prepare_images` gives new images). Unrotated
    classes are read from ``images`` in place, with no copy.

    ``data_fingerprint`` and ``class_split`` are class attributes, not constructor arguments:
    None until set on an instance, as the ``folder`` datasets set them on the samplers they
    build; the :class:`~metalearn.Trainer` reads them. ``data_fingerprint``: what identifies the
    images drawn from, where they come from a folder of the user's; a run stores it and refuses
    to resume on other images. None: the dataset is fixed by its name (Omniglot, verified on
    download).
    ``class_split``: for class folders split by fractions or a split file, the class names of
    each part (``{"train": [...], "val": [...], "test": [...]}``); a run writes it beside its
    checkpoint (``split.json``) and evaluates on it.

    ``augment``: random changes to every image drawn (:class:`Augmentation`; ``"crop,flip,color"``
    or some of these parts, ``""`` for none), for training episodes only: ``build_task_source``
    gives them to the training sampler of a run with ``--augment`` and never to its validation
    or test samplers. Their random values are drawn from the same generator after the episodes'
    (so the episodes are those drawn without augmentation) and for every task before
    ``tasks`` keeps its slice (so a rank's share is the full batch's).
    """

    data_fingerprint: str | None = None
    class_split: dict[str, list[str]] | None = None

    def __init__(self, images: Tensor, pool: ClassPool, ways: int, shots: int, query: int,
                 dataset: str = "your data", test: bool | None = None, class_sizes: Tensor | None = None,
                 dtype: torch.dtype = torch.float32, augment: str = "", ways_follow: bool = False,
                 evaluation: bool = False):
        check_whole("EpisodeSampler", ways=ways, shots=shots, query=query)
        dims = (4,) if class_sizes is not None else (4, 5)
        # a tensor and a ClassPool first: the checks below read them as such, and a NumPy array
        # would be refused for its shape (which may be right) or fail as an AttributeError
        if not isinstance(images, Tensor):
            shaped = hasattr(images, "dtype") and hasattr(images, "shape")
            shown = f" {images.dtype} {tuple(images.shape)}" if shaped else ""
            raise MetalearnError(f"EpisodeSampler takes images as a torch tensor, got a {kind_of(images)}{shown}; give "
                                 "torch.from_numpy(images) for a NumPy array (uint8, (classes, examples, [C,] H, W))")
        if not isinstance(pool, ClassPool):
            raise MetalearnError(
                f"EpisodeSampler's pool must be a ClassPool (metalearn.data.splits), the classes to draw from, got "
                f"{type(pool).__name__}: ClassPool(\"mine\", torch.arange(n), torch.zeros(n, dtype=torch.long)) draws "
                "from classes 0..n-1 of the images, unrotated (other class indices in place of torch.arange(n) "
                "pick those); omniglot_split(omniglot, split, part) gives a named Omniglot split's")
        examples = images.is_floating_point() and class_sizes is not None and images.dim() >= 2
        if not examples and (images.dtype != torch.uint8 or images.dim() not in dims):
            raise MetalearnError(
                f"EpisodeSampler takes uint8 images shaped (classes, examples, [C,] H, W), or (n_images, C, H, W) "
                f"with class_sizes, or floating-point examples (n, ...) with class_sizes, got {images.dtype} "
                f"{tuple(images.shape)}; EpisodeSampler.from_labels(examples, labels, ...) builds one from examples "
                "and their labels"
            )
        if class_sizes is None:
            if images.dim() == 4:
                images = images.unsqueeze(2)  # (classes, examples, 1, H, W)
            sizes = torch.full((images.shape[0],), images.shape[1], dtype=torch.long)
        else:
            sizes = torch.as_tensor(class_sizes, dtype=torch.long)
            if int(sizes.sum()) != images.shape[0]:
                raise MetalearnError(f"class_sizes add up to {int(sizes.sum())} images, but there are {images.shape[0]}")
            if bool((sizes[pool.characters] < 1).any()):  # a class to draw from with nothing to draw
                empty = int(pool.characters[sizes[pool.characters] < 1][0])
                raise MetalearnError(f"class {empty} of the pool has no examples (class_sizes[{empty}] is "
                                     f"{int(sizes[empty])}): leave it out of the pool")
        if images.shape[-2] != images.shape[-1] and bool((pool.rotations != 0).any()):
            raise MetalearnError(f"rotated classes need square images, got {images.shape[-2]}x{images.shape[-1]}")
        if class_sizes is not None and bool((pool.rotations != 0).any()):
            raise MetalearnError("rotated classes need images shaped (classes, examples, [C,] H, W)")
        pool_sizes = sizes[pool.characters]
        drawings = int(pool_sizes.min()) if len(pool) else 0
        # errors name what set this shape, as the caller spells it (errors.OptionError): for a
        # sampler of one's own (test None) its arguments (ways=7), alike both ways; for a run's
        # (build_task_source) the TaskConfig fields from Python (test_ways=7) and their flags on
        # the command line (--test-ways 7), the training ones, or for test episodes the test_*
        # ones, which an evaluation sets with evaluate_run's episode_shape (metalearn eval's and
        # compare's --ways, --shots, --query): named so alone in an evaluation's own sampler
        own = test is None
        prefix = "test_" if test else ""
        evaluated = bool(test) and evaluation

        def option(key: str) -> str | tuple[str, str]:  # the argument "ways", or the field and flag test_ways
            if evaluated:
                return EVALUATION_SHAPE[key]
            return (key, key) if own else prefix + key

        def setting(key: str, number: int) -> tuple[str, str]:  # ways=7, or test_ways=7 and --test-ways 7
            if evaluated:  # episode_shape's ways 7 and --ways 7
                return tuple(f"{name} {number}" for name in EVALUATION_SHAPE[key])
            python = f"{key if own else prefix + key}={number}"
            return (python, python) if own else (python, f"{flag(prefix + key)} {number}")

        def also(*keys: str) -> tuple[str, str]:  # where an evaluation sets the test episodes' shape
            if not test or evaluated:
                return "", ""
            return (f" (in evaluate_run: episode_shape's {' or '.join(keys)})",
                    f" (in {TEST_SHAPE_COMMANDS}: {' or '.join(flag(key) for key in keys)})")

        # the dataset and split names as fields: a folder's path is quoted as it is, braces and all
        quoted = {"dataset": (dataset, dataset), "pool": (pool.name, pool.name)}
        if ways < 2:
            raise OptionError(f"{{ways}} must be at least 2, got {ways}{{also}}", ways=option("ways"),
                              also=also("ways"))
        if shots < 1 or query < 1:
            raise OptionError(f"{{shots}} and {{query}} must be at least 1, got {shots} and {query}{{also}}",
                              shots=option("shots"), query=option("query"), also=also("shots", "query"))
        if shots + query > drawings and len(pool):
            noun = ("image" if images.dtype == torch.uint8 else "example") + ("" if drawings == 1 else "s")
            has = f"has {drawings} {noun} per class" if class_sizes is None else f"has a class of {drawings} {noun}"
            raise OptionError(
                f"{{dataset}} {has}; {{given_shots}} with {{given_query}} needs {shots + query}. Lower {{shots}} or "
                "{query}{also}.", given_shots=setting("shots", shots), given_query=setting("query", query),
                shots=option("shots"), query=option("query"), also=also("shots", "query"), **quoted)
        if ways > len(pool):
            given, noted = setting("ways", ways)
            if evaluated and ways_follow:  # the run's test ways, which the evaluation keeps where not given
                given, noted = given + " (the run's)", noted + " (the run's)"
            elif test and ways_follow:  # the test episodes' ways, which the user never typed
                given, noted = given + " (it defaults to ways)", noted + " (it defaults to --ways)"
            where = "use a pool with" if own else "use a split part with"
            split = " split {pool}" if pool.name else ""
            if not pool.name:  # from_labels's pool: every class of the examples given
                where = "give examples of"
            if not evaluated:
                fix = f"Lower {{ways}}{{also}} or {where} more classes"
            elif len(pool) >= 2:  # an evaluation draws from the run's split part: fewer ways are its way out
                fix = f"Lower {{ways}} to {len(pool)} or fewer"
            else:
                fix = "An episode takes 2 or more classes"
            raise OptionError(
                f"{{dataset}}{split} has {len(pool)} classes; {{given}} is more than that. {fix}.",
                given=(given, noted), ways=option("ways"), also=also("ways"), **quoted)
        check_dtype("EpisodeSampler", "images", dtype)
        self.dtype = dtype
        self.augmentation = Augmentation(augment)
        if augment and images.dtype != torch.uint8:
            raise MetalearnError("augment changes uint8 images; these examples are floating-point: leave augment out")
        self.pool = pool
        self.ways, self.shots, self.query = ways, shots, query
        # what a run trained on a sampler of one's own records as its task source
        # (Trainer.task_source): images the user chose, which config.json's dataset may not
        # describe (metalearn eval would score another dataset); build_task_source's (test True or
        # False) are the registry's
        self.source_name = f"EpisodeSampler ({dataset})" if own else None
        self.random_rotation = bool((pool.rotations < 0).any())
        if self.random_rotation and not bool((pool.rotations < 0).all()):
            raise MetalearnError(f"split {pool.name} mixes fixed and random rotations")
        if class_sizes is not None:  # a flat bank, read in place: variant = pool position
            self.image_shape = tuple(images.shape[1:])
            self.bank = images
            self.starts = (torch.cumsum(sizes, 0) - sizes)[pool.characters]
            self.sizes = pool_sizes
        else:
            self.image_shape = tuple(images.shape[2:])
            selected = images[pool.characters]  # (classes, drawings, C, H, W)
            if self.random_rotation:  # variants: class * 4 + turns
                variants = torch.stack([torch.rot90(selected, k, dims=(-2, -1)) for k in range(4)], 1)
            else:
                variants = selected.clone()
                for k in (1, 2, 3):
                    chosen = pool.rotations == k
                    if bool(chosen.any()):
                        variants[chosen] = torch.rot90(selected[chosen], k, dims=(-2, -1))
            per_class = images.shape[1]
            self.bank = variants.reshape(-1, *self.image_shape).contiguous()  # (variants*drawings, C, H, W)
            n_variants = self.bank.shape[0] // per_class
            self.starts = torch.arange(n_variants) * per_class
            self.sizes = torch.full((len(pool),), per_class, dtype=torch.long)
        self.drawings = int(self.sizes.max())  # the most images of any class: the draw's width
        self.augmentation.check_images(self.image_shape)

    @classmethod
    def from_labels(cls, examples: Any, labels: Any, ways: int, shots: int, query: int, dataset: str = "your data",
                    dtype: torch.dtype = torch.float32) -> "EpisodeSampler":
        """A sampler of the episodes of labelled examples in memory (learn2learn's
        ``TaskDataset`` with ``NWays`` and ``KShots``): ``examples`` ``(n, ...)``, uint8 images
        ``(n, C, H, W)`` (drawn as floats in [0, 1]) or floating-point examples of any shape,
        feature vectors ``(n, d)`` or images already normalised (drawn as they are, in
        ``dtype``); ``labels`` ``(n,)`` integer class labels, any values in any order. A torch
        tensor or a NumPy array each. Every distinct label is a class; an episode draws
        ``ways`` of them and ``shots + query`` distinct examples of each, relabelled 0..ways-1.
        The sampler's ``labels`` are the label values in the order of its classes. ``dataset``
        names the data in messages. Split the classes into training and test classes before:
        one sampler for each."""
        try:
            examples = torch.as_tensor(examples) if not isinstance(examples, Tensor) else examples
        except (TypeError, ValueError, RuntimeError):
            raise MetalearnError("EpisodeSampler.from_labels takes examples as a tensor or NumPy array of numbers "
                                 f"(n, ...), got {type(examples).__name__}") from None
        try:
            labels = torch.as_tensor(labels) if not isinstance(labels, Tensor) else labels
        except (TypeError, ValueError, RuntimeError):  # class names: torch's own words name no argument
            raise MetalearnError("EpisodeSampler.from_labels takes labels as (n,) integers; map class names to ids "
                                 "first, e.g. ids = {name: i for i, name in enumerate(sorted(set(names)))}") from None
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise MetalearnError(f"EpisodeSampler.from_labels takes labels as (n,) integers, got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
        if examples.dim() < 2 or examples.shape[0] != labels.shape[0]:
            scalar = "; examples of one number each need a last axis of 1 (examples[:, None])" if (
                examples.dim() == 1 and examples.shape[0] == labels.shape[0]) else ""
            raise MetalearnError(f"EpisodeSampler.from_labels takes examples (n, ...) with one label each: got "
                                 f"{tuple(examples.shape)} examples and {labels.shape[0]} labels{scalar}")
        order = torch.argsort(labels, stable=True)
        values, counts = torch.unique_consecutive(labels[order], return_counts=True)
        pool = ClassPool("", torch.arange(len(values)), torch.zeros(len(values), dtype=torch.long))  # all of them
        sampler = cls(examples[order].contiguous(), pool, ways, shots, query, dataset=dataset, class_sizes=counts,
                      dtype=dtype)
        sampler.labels = values
        # what a run trained on it records as its task source (Trainer.task_source): examples of
        # the user's own, which no registered dataset rebuilds
        sampler.source_name = f"EpisodeSampler.from_labels ({dataset})"
        return sampler

    def augmented(self, augment: str) -> "EpisodeSampler":
        """This sampler drawing the same episodes, with ``augment``'s changes (an ``--augment``
        value, ``""`` for none) applied to their images; the images are shared, not copied."""
        if augment and self.bank.dtype != torch.uint8:
            raise MetalearnError("augment changes uint8 images; these examples are floating-point: leave augment out")
        sampler = copy.copy(self)
        sampler.augmentation = Augmentation(augment)
        sampler.augmentation.check_images(self.image_shape)
        return sampler

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(classes, drawings, rotations) of ``num_tasks`` episodes: positions in the pool
        (tasks, ways), image numbers within each class (tasks, ways, shots+query), quarter turns
        (tasks, ways). A class with fewer images than the largest draws among its own only."""
        check_draw("EpisodeSampler", num_tasks, generator)
        classes = _distinct_classes(num_tasks, len(self.pool), self.ways, generator)
        # float32 draws whatever torch's default dtype (a float64 default draws other numbers from the
        # same generator): a seed gives the same episodes called directly as in the Trainer and evaluate
        keys = torch.rand(num_tasks, self.ways, self.drawings, generator=generator, dtype=torch.float32)
        sizes = self.sizes[classes]
        if bool((sizes < self.drawings).any()):  # positions beyond a class's images sort last
            keys = keys.masked_fill(torch.arange(self.drawings) >= sizes[..., None], 2.0)
        draws = keys.argsort(dim=2)[..., : self.shots + self.query]
        random_turns = torch.randint(0, 4, (num_tasks, self.ways), generator=generator)
        rotations = self.pool.rotations[classes]
        rotations = torch.where(rotations < 0, random_turns, rotations)
        return classes, draws, rotations

    def sample(self, num_tasks: int, generator: torch.Generator, tasks: slice | None = None) -> TaskBatch:
        """A batch of ``num_tasks`` episodes; ``tasks`` keeps only that slice of them (the
        share of one distributed rank), drawn identically to the full batch."""
        classes, draws, rotations = self.sample_indices(num_tasks, generator)
        # drawn after the episodes, for every task: the episodes are those drawn without
        # augmentation, and a slice of tasks gets what the whole batch gets
        changes = self.augmentation.draw(draws.shape, min(self.image_shape[-2:]), generator) \
            if self.augmentation else None
        if tasks is not None:
            classes, draws, rotations = classes[tasks], draws[tasks], rotations[tasks]
            changes = changes.map(lambda values: values[tasks]) if changes is not None else None
        variant = classes * 4 + rotations if self.random_rotation else classes
        index = self.starts[variant][:, :, None] + draws  # (tasks, ways, shots + query) rows of the bank
        t = draws.shape[0]

        def gather(part: slice) -> Tensor:  # support and query gathered apart: no copy of a slice
            rows = index[..., part]
            per_task = rows.shape[1] * rows.shape[2]
            pixels = self.bank.index_select(0, rows.reshape(-1))
            if changes is None:
                floats = to_float(pixels, self.dtype) if pixels.dtype == torch.uint8 else pixels.to(self.dtype)
                return floats.view(t, per_task, *self.image_shape)
            mine = changes.map(lambda values: values[:, :, part].flatten(0, 2))  # one row per image, as rows
            return self.augmentation.apply(pixels, mine, self.dtype).view(t, per_task, *self.image_shape)

        labels = torch.arange(self.ways)
        support_x, query_x = gather(slice(None, self.shots)), gather(slice(self.shots, None))
        support_y = labels.repeat_interleave(self.shots).repeat(t, 1)
        query_y = labels.repeat_interleave(self.query).repeat(t, 1)
        return TaskBatch(support_x, support_y, query_x, query_y, ways=self.ways)


def _distinct_classes(num_tasks: int, n_classes: int, ways: int, generator: torch.Generator) -> Tensor:
    """(tasks, ways) distinct class ids per row, uniformly, in random order.

    Draws with replacement and redraws the rows that repeat a class: far cheaper than a
    permutation of thousands of classes per task. When repeats would be common (ways close to
    n_classes) a top-k over uniform noise is used instead.
    """
    if ways * ways > n_classes:
        return torch.rand(num_tasks, n_classes, generator=generator, dtype=torch.float32).topk(ways, dim=1).indices
    classes = torch.randint(n_classes, (num_tasks, ways), generator=generator)
    while True:
        ordered = classes.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if not repeated.any():
            return classes
        classes[repeated] = torch.randint(n_classes, (int(repeated.sum()), ways), generator=generator)


# -- augmentation of training images (--augment) ------------------------------------------------

JITTER = 0.4  # ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4): factors in [0.6, 1.4)
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
# the floats of the images changed at a time: a few MB stay in the processor's cache through the
# dozen passes of conversion and colour, which over a whole meta-batch (217 MB for 32 5-way
# 15-query tasks at 84x84 RGB) would each go to memory and back; much smaller chunks pay
# torch's per-call overhead instead
CHUNK_BYTES = 4 << 20


def crop_padding(side: int) -> int:
    """Zero padding on each edge before a random crop of an image of ``side`` pixels: a tenth of
    the side, at least 1 pixel (8 at 84: mini-ImageNet's ``RandomCrop(84, padding=8)``)."""
    return max(1, side // 10)


@dataclass(frozen=True)
class AugmentDraws:
    """The random values of every image's changes, each tensor with the leading shape of the
    images it applies to: ``offsets`` (..., 2) the crop's top and left in the padded image,
    ``flips`` (...) bool, ``factors`` (..., 3) brightness, contrast and saturation, ``orders``
    (..., 3) a permutation of (0, 1, 2), the order those apply in. None: that part is off."""

    offsets: Tensor | None = None
    flips: Tensor | None = None
    factors: Tensor | None = None
    orders: Tensor | None = None

    def map(self, change: Callable[[Tensor], Tensor]) -> "AugmentDraws":
        """Every tensor changed alike (a slice of tasks, the support part, a reshape)."""
        return replace(self, **{f.name: change(getattr(self, f.name)) for f in fields(self)
                                if getattr(self, f.name) is not None})


class Augmentation:
    """Random changes to training images (``--augment``), as the few-shot papers on photographs
    make them: MetaOptNet (Lee et al. 2019) and RFS (Tian et al. 2020) train mini-ImageNet with
    torchvision's ``RandomCrop(84, padding=8)``, ``ColorJitter(0.4, 0.4, 0.4)`` and
    ``RandomHorizontalFlip()``, in that order, on training images only. ``parts``: a
    ``--augment`` value, e.g. ``"crop,flip,color"``; :meth:`draw` draws the random values,
    :meth:`apply` applies them, to every image independently, batched over all images at once:

    - ``crop``: the image, padded with zeros by :func:`crop_padding` pixels on each edge (8 at
      84), is cropped back to its size at a random offset, each of ``0 .. 2 * pad`` equally likely
      along each axis (torchvision's ``RandomCrop(side, padding=pad)``);
    - ``flip``: mirrored left to right with probability 1/2 (``RandomHorizontalFlip()``);
    - ``color``: brightness, contrast and saturation factors ``b, c, s`` drawn uniformly from
      ``[0.6, 1.4)`` and applied in a random order (``ColorJitter(0.4, 0.4, 0.4)``), with
      torchvision's definitions for float images in ``[0, 1]``: ``blend(x, y, f) = clamp(f * x +
      (1 - f) * y, 0, 1)``; brightness ``blend(x, 0, b)``; contrast ``blend(x, m, c)`` with ``m``
      the mean over the image of its grey version; saturation ``blend(x, g, s)`` with ``g`` the
      grey version per pixel; grey ``= 0.2989 R + 0.587 G + 0.114 B``. A one-channel image is its
      own grey version, so saturation leaves it as it is (as torchvision does).

    Crop and flip move pixels, colour changes values; a flip commutes with the colour changes
    (they treat every pixel alike), so the flip follows the crop and colour comes last.

    >>> augmentation = Augmentation("crop,flip")
    >>> images = torch.rand(6, 3, 84, 84)
    >>> draws = augmentation.draw((6,), 84, torch.Generator().manual_seed(0))
    >>> augmentation.apply(images, draws).shape
    torch.Size([6, 3, 84, 84])
    """

    def __init__(self, parts: str, owner: str = "EpisodeSampler"):
        self.parts = augment_parts(parts, owner)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Refuse images of ``shape`` (C, H, W) that the parts cannot change: colour takes 1 (grey)
        or 3 (RGB) channels, whose grey version it defines."""
        if "color" in self.parts and shape[0] not in (1, 3):
            raise MetalearnError(f"augment color changes grey (1-channel) or RGB (3-channel) images, not images of "
                                 f"{shape[0]} channels: leave color out")

    def __repr__(self) -> str:
        return f"Augmentation({','.join(self.parts)!r})"

    def draw(self, shape: tuple[int, ...], side: int, generator: torch.Generator) -> AugmentDraws:
        """The random values for images of leading ``shape`` (the sampler's (tasks, ways,
        shots + query)) of ``side`` pixels (the smaller side), all from ``generator``, in the
        order crop, flip, color, each only where its part is on."""
        draws = {}
        if "crop" in self.parts:
            draws["offsets"] = torch.randint(0, 2 * crop_padding(side) + 1, (*shape, 2), generator=generator)
        if "flip" in self.parts:
            draws["flips"] = torch.rand(shape, generator=generator, dtype=torch.float32) < 0.5  # as the episodes
        if "color" in self.parts:
            draws["factors"] = torch.rand((*shape, 3), generator=generator, dtype=torch.float32) * (2 * JITTER) + (
                1 - JITTER)
            draws["orders"] = torch.rand((*shape, 3), generator=generator, dtype=torch.float32).argsort(dim=-1)
        return AugmentDraws(**draws)

    def apply(self, images: Tensor, draws: AugmentDraws, dtype: torch.dtype | None = None) -> Tensor:
        """``images`` (n, C, H, W), uint8 pixels or floats in [0, 1], changed by ``draws``
        (leading shape (n,)): a new tensor of floats in [0, 1] of ``dtype`` (default: the
        images', float32 for uint8). Crop and flip move uint8 pixels before the conversion
        (:func:`~metalearn.data.images.to_float`), which gives the floats that moving them after
        it would; the images go a few at a time (``CHUNK_BYTES``)."""
        n = images.shape[0]
        if draws.offsets is not None and n and int(draws.offsets.max()) > 2 * crop_padding(min(images.shape[-2:])):
            raise MetalearnError(f"the crop offsets were drawn for larger images than these "
                                 f"{images.shape[-2]}x{images.shape[-1]}: draw them with the images' side")
        dtype = dtype or (images.dtype if images.is_floating_point() else torch.float32)
        out = torch.empty(images.shape, dtype=dtype)
        chunk = max(1, CHUNK_BYTES // max(1, out[:1].numel() * out.element_size()))
        for start in range(0, n, chunk):
            part = draws.map(lambda values: values[start:start + chunk])
            changed = images[start:start + chunk]
            if part.offsets is not None or part.flips is not None:
                changed = crop_and_flip(changed, part.offsets, part.flips)
            target = out[start:start + chunk]
            if changed.is_floating_point():
                target.copy_(changed)
            else:
                target.copy_(changed).div_(255.0)  # to_float's conversion, into place
            if part.factors is not None:
                jitter_colors(target, part.factors.to(dtype), part.orders)
        return out


def crop_and_flip(images: Tensor, offsets: Tensor | None, flips: Tensor | None) -> Tensor:
    """``images`` (n, C, H, W) cropped at ``offsets`` (n, 2) (top, left) of the images
    zero-padded by :func:`crop_padding` of their smaller side, then mirrored left to right where
    ``flips`` (n,) is true; either may be None (no crop, no flip). One gather of every pixel of
    the result from its place in the (padded) image; a new tensor."""
    n, c, h, w = images.shape
    if offsets is not None:
        pad = crop_padding(min(h, w))
        images = F.pad(images, (pad, pad, pad, pad))
    else:
        offsets = torch.zeros(n, 2, dtype=torch.long)
    width = images.shape[-1]
    columns = torch.arange(w).expand(n, w)
    if flips is not None:
        columns = torch.where(flips[:, None], w - 1 - columns, columns)
    rows = offsets[:, :1] + torch.arange(h)  # (n, h), in the padded image
    columns = offsets[:, 1:] + columns  # (n, w)
    where = (rows[:, :, None] * width + columns[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return images.reshape(n, c, -1).gather(2, where).view(n, c, h, w)


def _grey(images: Tensor) -> Tensor:
    """(n, 1, H, W): torchvision's ``rgb_to_grayscale``; a one-channel image as it is."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(dim=1)
    return r.mul(GREY[0]).add_(g, alpha=GREY[1]).add_(b, alpha=GREY[2]).unsqueeze(1)


def jitter_colors(images: Tensor, factors: Tensor, orders: Tensor) -> Tensor:
    """``images`` (n, C, H, W) floats, changed in place: brightness, contrast and saturation by
    ``factors`` (n, 3), in the order ``orders`` (n, 3) gives each image (a permutation of 0, 1,
    2: brightness, contrast, saturation). Returns ``images``.

    Each change is ``blend(x, y, f)`` with ``y`` 0 (brightness), the mean ``m`` of the grey image
    (contrast) or the grey image ``g`` (saturation), so each of the three steps changes every
    image at once: ``clamp(f x + ((1 - f) m [contrast] + (1 - f) g [saturation]), 0, 1)``, the
    term of a change the image does not make at that step being 0 (added exactly), so that the
    sum is the one torchvision's ``_blend`` forms."""
    n, channels = images.shape[:2]
    for step in range(3):
        change = orders[:, step]  # (n,) 0 brightness, 1 contrast, 2 saturation
        factor = factors.gather(1, change[:, None])[:, 0]
        if channels == 1:  # saturation leaves a grey image as it is
            factor = torch.where(change == 2, torch.ones_like(factor), factor)
        rest = 1 - factor
        grey = _grey(images)
        mean = torch.where(change == 1, rest, 0) * grey.mean(dim=(-3, -2, -1))  # (n,)
        weight = torch.where((change == 2) & (channels > 1), rest, 0)
        # the term added, formed once at (n, 1, H, W) for all channels: one pass over the images per step
        other = (grey * weight[:, None, None, None]).add_(mean[:, None, None, None])  # (n, 1, H, W)
        images.mul_(factor[:, None, None, None]).add_(other).clamp_(0.0, 1.0)
    return images
