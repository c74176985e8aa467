"""N-way K-shot episodes drawn straight from a cached uint8 image tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from metalearn.data.images import to_float
from metalearn.data.splits import ClassPool
from metalearn.errors import MetalearnError, kind_of
from metalearn.tasks.batch import TaskBatch


class EpisodeSampler:
    """Draws batches of N-way K-shot classification tasks.

    Each task picks ``ways`` distinct classes of the pool in random order (so the label of a
    class is re-drawn every episode), then ``shots + query`` distinct images of each. A class
    whose rotation is -1 gets a random quarter turn per task. Everything is drawn from the given
    ``torch.Generator``, so a seed gives the same episodes on any run.

    images: uint8 pixels, one of
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
    command-line options that set it (``--test-ways``, ``--ways``). ``dtype``: the
    floating-point type of the images drawn (float64 for a float64 model).

    The pool's images are rotated once, up front, into a bank of every (class, rotation) the
    pool can produce (at 28x28 about 64 MB for the largest Omniglot split part), so drawing a
    batch is one ``index_select`` and one conversion to float (:func:`metalearn.data.images.to_float`,
    the conversion :func:`~metalearn.data.images.prepare_images` gives new images). Unrotated
    classes are read from ``images`` in place, with no copy.

    ``data_fingerprint``: what identifies the images drawn from, where they come from a folder
    of the user's (set by the ``folder`` datasets); a run stores it and refuses to resume on
    other images. None: the dataset is fixed by its name (Omniglot, verified on download).
    ``class_split``: for class folders split by fractions or a split file, the class names of
    each part (``{"train": [...], "val": [...], "test": [...]}``); a run writes it beside its
    checkpoint (``split.json``) and evaluates on it.
    """

    data_fingerprint: str | None = None
    class_split: dict[str, list[str]] | None = None

    def __init__(self, images: Tensor, pool: ClassPool, ways: int, shots: int, query: int,
                 dataset: str = "omniglot", test: bool | None = None, class_sizes: Tensor | None = None,
                 dtype: torch.dtype = torch.float32):
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
        if images.dtype != torch.uint8 or images.dim() not in dims:
            raise MetalearnError(
                f"EpisodeSampler takes uint8 images shaped (classes, examples, [C,] H, W), or (n_images, C, H, W) "
                f"with class_sizes, got {images.dtype} {tuple(images.shape)}; for other images build TaskBatch "
                "objects yourself"
            )
        if class_sizes is None:
            if images.dim() == 4:
                images = images.unsqueeze(2)  # (classes, examples, 1, H, W)
            sizes = torch.full((images.shape[0],), images.shape[1], dtype=torch.long)
        else:
            sizes = torch.as_tensor(class_sizes, dtype=torch.long)
            if int(sizes.sum()) != images.shape[0]:
                raise MetalearnError(f"class_sizes add up to {int(sizes.sum())} images, but there are {images.shape[0]}")
        if images.shape[-2] != images.shape[-1] and bool((pool.rotations != 0).any()):
            raise MetalearnError(f"rotated classes need square images, got {images.shape[-2]}x{images.shape[-1]}")
        if class_sizes is not None and bool((pool.rotations != 0).any()):
            raise MetalearnError("rotated classes need images shaped (classes, examples, [C,] H, W)")
        pool_sizes = sizes[pool.characters]
        drawings = int(pool_sizes.min()) if len(pool) else 0
        # errors name what set this shape: for a sampler of one's own (test None) its arguments;
        # for a run's (build_task_source) the options, the training ones, or for test episodes
        # train's --test-* options (which `metalearn eval` calls --ways/--shots/--query)
        python = test is None

        def name(option: str) -> str:  # as given: "--test-ways", "--ways", or the argument "ways"
            return option if python else ("--test-" if test else "--") + option

        def value(option: str, number: int) -> str:
            return f"{option}={number}" if python else f"{name(option)} {number}"

        def also(*names: str) -> str:
            return f" (in metalearn eval: {' or '.join('--' + n for n in names)})" if test else ""

        if ways < 2:
            raise MetalearnError(f"{name('ways')} must be at least 2, got {ways}{also('ways')}")
        if shots < 1 or query < 1:
            raise MetalearnError(f"{name('shots')} and {name('query')} must be at least 1, got {shots} and "
                                 f"{query}{also('shots', 'query')}")
        if shots + query > drawings and len(pool):
            noun = "image" if drawings == 1 else "images"
            has = f"has {drawings} {noun} per class" if class_sizes is None else f"has a class of {drawings} {noun}"
            raise MetalearnError(
                f"{dataset} {has}; {value('shots', shots)} with {value('query', query)} needs {shots + query}. "
                f"Lower {name('shots')} or {name('query')}{also('shots', 'query')}."
            )
        if ways > len(pool):
            given = value("ways", ways) + (" (it defaults to --ways)" if test else "")
            where = "a pool" if python else "a split part"
            raise MetalearnError(
                f"{dataset} split {pool.name} has {len(pool)} classes; {given} is more "
                f"than that. Lower {name('ways')}{also('ways')} or use {where} with more classes."
            )
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise MetalearnError(f"EpisodeSampler draws images as floats: dtype must be a floating-point type, got {dtype}")
        self.dtype = dtype
        self.pool = pool
        self.ways, self.shots, self.query = ways, shots, query
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

    def sample_indices(self, num_tasks: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(classes, drawings, rotations) of ``num_tasks`` episodes: positions in the pool
        (tasks, ways), image numbers within each class (tasks, ways, shots+query), quarter turns
        (tasks, ways). A class with fewer images than the largest draws among its own only."""
        classes = _distinct_classes(num_tasks, len(self.pool), self.ways, generator)
        keys = torch.rand(num_tasks, self.ways, self.drawings, generator=generator)
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
        if tasks is not None:
            classes, draws, rotations = classes[tasks], draws[tasks], rotations[tasks]
        variant = classes * 4 + rotations if self.random_rotation else classes
        index = self.starts[variant][:, :, None] + draws  # (tasks, ways, shots + query) rows of the bank
        t = draws.shape[0]

        def gather(rows: Tensor) -> Tensor:  # support and query gathered apart: no copy of a slice
            per_task = rows.shape[1] * rows.shape[2]
            return to_float(self.bank.index_select(0, rows.reshape(-1)), self.dtype).view(t, per_task, *self.image_shape)

        labels = torch.arange(self.ways)
        support_x, query_x = gather(index[..., : self.shots]), gather(index[..., self.shots :])
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
        return torch.rand(num_tasks, n_classes, generator=generator).topk(ways, dim=1).indices
    classes = torch.randint(n_classes, (num_tasks, ways), generator=generator)
    while True:
        ordered = classes.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if not repeated.any():
            return classes
        classes[repeated] = torch.randint(n_classes, (int(repeated.sum()), ways), generator=generator)
