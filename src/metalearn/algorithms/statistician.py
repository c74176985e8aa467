"""The Neural Statistician (Edwards & Storkey, ICLR 2017): a variational autoencoder over sets,
whose learned statistic of a set classifies new characters and draws new images of them.

Each class's support images in a task form one set D. A statistic network pools a shared
convolutional encoding of every image (mean over the set) into q(c | D), a diagonal Gaussian
over the context c with prior p(c) = N(0, I) (section 3). Given c, each image has latents
z_1..z_L with inference network q(z_l | z_{l-1}, x, c) and latent decoder p(z_l | z_{l-1}, c)
(top layer: given c alone), and a Bernoulli observation decoder p(x | z_1..z_L, c) (section 3,
appendix B.1 for the Omniglot networks). The meta-loss is the negative per-set lower bound
(section 3, eq. 8-10), in nats per image, averaged over the batch's sets::

    L_D = E_q [ sum_x log p(x | z, c) ] - KL(q(c | D) || p(c)) - E_q [ sum_x sum_l KL(q(z_l | .) || p(z_l | .)) ]

Early in training the reconstruction is weighted by 1 + a and the KL terms by 1 / (1 + a), with a
halved every ``alpha_halve_every`` steps, as the public re-implementation of the paper by Conor
Durkan does (``reweight_alpha`` 0: the plain bound); the metric ``bound`` is always the plain one.

Few-shot classification (the paper's Omniglot experiments): a query x goes to the class i whose
q(c | D_i) is closest to q(c | {x}), by D_KL(q(c | D_i) || q(c | x)), the direction that the
public re-implementation ashysheya/neural-stat computes (not checked against the paper's text); ``predict`` returns
-KL per class as logits. Few-shot generation: c ~ q(c | D), z ~ p(z | c), x ~ p(x | z, c)
(:meth:`NeuralStatistician.sample`).

Evaluation computes every set on its own: a query's class never depends on the other sets or
episodes evaluated with it. In training, ``conv_norm="batch"`` (the public
re-implementations' batch norm) normalises over the whole meta-batch, its sums added over
torchrun's ranks, so that two ranks compute what one process does; evaluation then uses the
running statistics. The noise of a set (binarisation, sample dropout, c and z, and the optional
training augmentation: ``dilate``, ``reflect``) is drawn from a generator seeded by the set's
pixels and the training step, so two ranks draw what one process draws.

Example::

    >>> statistician = NeuralStatistician(StatisticianConfig())
    >>> loss, metrics = statistician.meta_loss(batch)      # batch: 5-way 5-shot Omniglot episodes
    >>> loss.backward()
    >>> logits = statistician.predict(batch)               # (tasks, n_query, ways), -KL
    >>> images = statistician.sample(batch.support_x[0, :5], num=10)   # (1, 10, 1, 28, 28)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.base import MAX_SAMPLES, MetaLearner, Problem, check_task_batch, evaluating
from metalearn.distributed import current_world
from metalearn.errors import ConfigError, MetalearnError, OptionError, check_count
from metalearn.options import option, options
from metalearn.tasks.batch import TaskBatch

OWNER = "NeuralStatistician.Config"
KL_DIRECTIONS = ("support-query", "query-support")
BINARIZATIONS = ("dynamic", "threshold")
CONV_NORMS = ("none", "batch", "group")
IMAGE_SIZE = 28  # the paper's Omniglot decoder: 4 -> 8 -> 16 -> 14 -> 28 pixels
LOGVAR_RANGE = (-12.0, 8.0)  # keeps exp() finite in float32 while the networks are still untrained
# images encoded in one pass by `context`: an evaluation chunk of 50 20-way 5-shot episodes holds
# 5000 support images, whose first feature maps alone would take 1 GB at once
IMAGES_PER_PASS = 512


@options
class StatisticianConfig:
    """The networks of appendix B.1 (Omniglot) and the training objective."""

    context_dim: int = option(512, "dimension of the context c, the statistic of a set (paper, Omniglot: 512)")
    latent_dim: int = option(16, "dimension of each stochastic layer z_l of an image (paper, Omniglot: 16)")
    latent_layers: int = option(1, "stochastic layers z_1..z_L per image (paper, Omniglot: 1)")
    hidden_dim: int = option(256, "width of the fully connected layers (paper: 256)", memory="a smaller")
    filters: int = option(64, "feature maps of the first convolutional block; the second and third have "
                               "twice and four times as many (paper: 64, 128, 256)")
    kl_direction: str = option("support-query", "few-shot classification by D_KL(q(c|D_i) || q(c|x)) "
                                                "(support-query, as ashysheya/neural-stat computes it) or "
                                                "D_KL(q(c|x) || q(c|D_i)) (query-support)")
    binarize: str = option("dynamic", "dynamic: each training image is a fresh Bernoulli draw of its pixel "
                                      "intensities (the paper); threshold: pixels above 0.5, as at test time")
    reweight_alpha: float = option(1.0, "training weighs the reconstruction by 1 + a and the KL terms by "
                                        "1 / (1 + a), a halved every --alpha-halve-every steps (0: the "
                                        "plain bound)")
    alpha_halve_every: int = option(500, "steps between halvings of --reweight-alpha")
    conv_norm: str = option("batch", "normalisation after each convolution of the encoder and the decoder: none; "
                                    "batch (batch norm over the meta-batch's images in training, summed over "
                                    "torchrun's ranks, running statistics at evaluation: the public "
                                    "re-implementations); group (up to 8 groups, each image on its own)")
    sample_dropout: float = option(0.2, "training leaves each image of a set but the first out of the statistic "
                                        "network's mean with this probability, and gives the network the number "
                                        "pooled (0: off, every image pooled and no count; 0.2 as the public "
                                        "re-implementation by ashysheya)")
    dilate: float = option(0.0, "training dilates each image of a set with this probability before binarising it: "
                                "each pixel takes the largest intensity of itself and its four neighbours (0: "
                                "off; ashysheya's re-implementation dilates with 0.5)")
    reflect: float = option(0.0, "training mirrors each set left-right, all its images together, with this "
                                 "probability (0: off)")

    def __post_init__(self):
        for name in ("context_dim", "latent_dim", "latent_layers", "hidden_dim", "filters", "alpha_halve_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(OWNER, name, f"must be a whole number of at least 1, got {value!r}")
        if self.kl_direction not in KL_DIRECTIONS:
            raise ConfigError(OWNER, "kl_direction", f"must be one of {', '.join(KL_DIRECTIONS)}, "
                                                     f"got {self.kl_direction!r}")
        if self.conv_norm not in CONV_NORMS:
            raise ConfigError(OWNER, "conv_norm", f"must be one of {', '.join(CONV_NORMS)}, "
                                                     f"got {self.conv_norm!r}")
        drop = self.sample_dropout
        if not isinstance(drop, (int, float)) or isinstance(drop, bool) or not 0 <= drop < 1:
            raise ConfigError(OWNER, "sample_dropout", f"must be a probability in [0, 1), got {drop!r}")
        for name in ("dilate", "reflect"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
                raise ConfigError(OWNER, name, f"must be a probability in [0, 1], got {p!r}")
        if self.binarize not in BINARIZATIONS:
            raise ConfigError(OWNER, "binarize", f"must be one of {', '.join(BINARIZATIONS)}, got {self.binarize!r}")
        alpha = self.reweight_alpha
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 <= alpha <= 1e6:
            raise ConfigError(OWNER, "reweight_alpha", f"must be a finite number between 0 and 1e6, got {alpha!r}")


# -- distributions ---------------------------------------------------------------------------


def gaussian_kl(mean_q: Tensor, logvar_q: Tensor, mean_p: Tensor, logvar_p: Tensor) -> Tensor:
    """D_KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p))) of diagonal Gaussians, summed
    over the last axis (shapes broadcast): (..., d) -> (...)."""
    ratio = (logvar_q - logvar_p).exp()
    return 0.5 * (ratio + (mean_q - mean_p).square() / logvar_p.exp() - 1.0 - (logvar_q - logvar_p)).sum(-1)


def standard_normal_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """D_KL(N(mean, exp(logvar)) || N(0, I)), summed over the last axis: (..., d) -> (...)."""
    return 0.5 * (logvar.exp() + mean.square() - 1.0 - logvar).sum(-1)


def bernoulli_log_likelihood(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x) of independent Bernoulli pixels with the given logits, summed over each image's
    (C, H, W): (..., C, H, W) -> (...). ``x`` in {0, 1} (any value in [0, 1] gives the
    cross-entropy)."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(-3).sum(-1)


def _split_gaussian(params: Tensor) -> tuple[Tensor, Tensor]:
    mean, logvar = params.chunk(2, dim=-1)
    return mean, logvar.clamp(*LOGVAR_RANGE)


# -- training augmentation ---------------------------------------------------------------------


def dilate_images(images: Tensor) -> Tensor:
    """Grey dilation of each image by the 3x3 cross: every pixel becomes the largest intensity of
    itself and its four neighbours (up, down, left, right; nothing beyond the border), which
    thickens the strokes by a pixel. (..., H, W) -> (..., H, W), intensities >= 0.

    For images in [0, 1] this is ``skimage.morphology.dilation`` with its default footprint, as
    the public re-implementation ``ashysheya/neural-stat`` applies it before binarising: its
    border mode repeats the edge pixel, which adds nothing to a maximum that already holds it."""
    padded = F.pad(images, (1, 1, 1, 1))  # zeros: below every intensity, so the border adds nothing
    neighbours = (padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], padded[..., 1:-1, :-2], padded[..., 1:-1, 2:])
    out = images
    for shifted in neighbours:
        out = torch.maximum(out, shifted)
    return out


# -- networks (appendix B.1, Omniglot) ---------------------------------------------------------


def _conv(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=padding)


class RankBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics are those of the whole meta-batch: under torchrun
    each rank's channel sums are added over the ranks by a differentiable all-reduce, so two
    ranks normalise (and differentiate) as one process does. Evaluation uses the running
    statistics, so a set's context never depends on the other sets evaluated with it."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        count = torch.tensor(float(x.shape[0] * x.shape[2] * x.shape[3]), dtype=x.dtype, device=x.device)
        sums = torch.cat([x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3)), count.view(1)])
        world = current_world(x.device)
        if world.distributed:
            from torch.distributed.nn.functional import all_reduce
            sums = all_reduce(sums)
        channels = self.num_features
        total = sums[-1]
        mean = sums[:channels] / total
        var = (sums[channels:2 * channels] / total - mean.square()).clamp_min(0.0)
        with torch.no_grad():
            unbiased = var * (total / (total - 1).clamp_min(1.0))
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(unbiased.detach(), self.momentum)
            self.num_batches_tracked += 1
        shape = (1, channels, 1, 1)
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) \
            + self.bias.view(shape)


def _norm(kind: str, channels: int) -> list[nn.Module]:
    if kind == "batch":
        return [RankBatchNorm2d(channels)]
    if kind == "group":
        return [nn.GroupNorm(math.gcd(8, channels), channels)]
    return []


class SharedEncoder(nn.Module):
    """x -> h: three blocks of two 3x3 convolutions and a stride-2 one, ``channels`` x (1, 2, 4)
    feature maps, each convolution followed by the ``norm`` layer (none, batch, group) and ELU:
    (n, 1, 28, 28) -> (n, 4 * channels * 4 * 4)."""

    def __init__(self, channels: int, norm: str = "none"):
        super().__init__()
        layers, cin = [], 1
        for width in (channels, 2 * channels, 4 * channels):
            for conv in (_conv(cin, width), _conv(width, width), _conv(width, width, 2)):
                layers += [conv, *_norm(norm, width), nn.ELU()]
            cin = width
        self.net = nn.Sequential(*layers)
        self.features = 4 * channels * 4 * 4

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


class ResidualMLP(nn.Module):
    """``depth`` fully connected ELU layers of width ``dim`` around a skip connection."""

    def __init__(self, dim: int, depth: int = 3):
        super().__init__()
        layers = []
        for i in range(depth):
            layers += [nn.Linear(dim, dim)] + ([nn.ELU()] if i < depth - 1 else [])
        self.net = nn.Sequential(*layers)

    def forward(self, e: Tensor) -> Tensor:
        return F.elu(e + self.net(e))


class StatisticNetwork(nn.Module):
    """q(c | D): a fully connected layer per image, the mean over the set, two more layers and
    the Gaussian's parameters. (sets, n, features) -> mean, logvar (sets, context_dim).

    With ``counted`` (sample dropout), ``keep`` (sets, n) masks the
    images that enter the mean, and the number kept is one more input of the layers after it."""

    def __init__(self, features: int, hidden: int, context_dim: int, counted: bool = False):
        super().__init__()
        self.counted = counted
        self.pre = nn.Sequential(nn.Linear(features, hidden), nn.ELU())
        self.post = nn.Sequential(nn.Linear(hidden + int(counted), hidden), nn.ELU(), nn.Linear(hidden, hidden),
                                  nn.ELU(), nn.Linear(hidden, 2 * context_dim))

    def forward(self, h: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        e = self.pre(h)
        if not self.counted:
            return _split_gaussian(self.post(e.mean(dim=1)))
        if keep is None:
            keep = torch.ones(e.shape[:2], dtype=e.dtype, device=e.device)
        count = keep.sum(dim=1, keepdim=True)
        pooled = (e * keep.unsqueeze(-1)).sum(dim=1) / count
        return _split_gaussian(self.post(torch.cat([pooled, count], dim=-1)))


class GaussianLayer(nn.Module):
    """A diagonal Gaussian over z_l from the sum of embedded inputs (h of the image, c of its
    set, z_{l-1} of the layer above; those given as None are left out): the inference network
    q(z_l | z_{l-1}, x, c) with ``features`` > 0, the latent decoder p(z_l | z_{l-1}, c) with 0."""

    def __init__(self, features: int, context_dim: int, latent_dim: int, hidden: int, above: bool):
        super().__init__()
        self.from_h = nn.Linear(features, hidden) if features else None
        self.from_c = nn.Linear(context_dim, hidden)
        self.from_z = nn.Linear(latent_dim, hidden) if above else None
        self.body = ResidualMLP(hidden)
        self.out = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, c: Tensor, h: Tensor | None = None, z_above: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """c: (sets, 1, context_dim); h: (sets, n, features); z_above: (sets, n, latent_dim)
        -> mean, logvar (sets, n or 1, latent_dim)."""
        e = self.from_c(c)
        if self.from_h is not None:
            e = e + self.from_h(h)
        if self.from_z is not None:
            e = e + self.from_z(z_above)
        return _split_gaussian(self.out(self.body(F.elu(e))))


class ObservationDecoder(nn.Module):
    """p(x | z_1..z_L, c): embedded z and c, a fully connected layer to 4 x 4 maps, then
    convolutions and 2x2 transposed convolutions up to 28 x 28 Bernoulli logits, each but the
    last followed by the ``norm`` layer (none, batch, group) and ELU."""

    def __init__(self, latents: int, context_dim: int, hidden: int, channels: int, norm: str = "none"):
        super().__init__()
        wide = 4 * channels
        self.from_z = nn.Linear(latents, hidden)
        self.from_c = nn.Linear(context_dim, hidden)
        self.to_maps = nn.Linear(hidden, wide * 4 * 4)
        self.wide = wide
        layers = []
        for layer, width in (
            (_conv(wide, wide), wide), (_conv(wide, wide), wide),
            (nn.ConvTranspose2d(wide, wide, 2, stride=2), wide),                                  # 8 x 8
            (_conv(wide, 2 * channels), 2 * channels), (_conv(2 * channels, 2 * channels), 2 * channels),
            (nn.ConvTranspose2d(2 * channels, 2 * channels, 2, stride=2), 2 * channels),          # 16 x 16
            (_conv(2 * channels, channels), channels), (_conv(channels, channels, padding=0), channels),  # 14 x 14
            (nn.ConvTranspose2d(channels, channels, 2, stride=2), channels),                      # 28 x 28
        ):
            layers += [layer, *_norm(norm, width), nn.ELU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(channels, 1, 1))

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        """z: (sets, n, L * latent_dim), c: (sets, 1, context_dim) -> logits (sets, n, 1, 28, 28)."""
        e = F.elu(self.to_maps(F.elu(self.from_z(z) + self.from_c(c))))
        sets, n = e.shape[:2]
        return self.net(e.reshape(sets * n, self.wide, 4, 4)).view(sets, n, 1, IMAGE_SIZE, IMAGE_SIZE)


# -- the method ------------------------------------------------------------------------------


class NeuralStatistician(MetaLearner):
    """The Neural Statistician (Edwards & Storkey 2017): a VAE over sets; few-shot classification
    by the KL divergence between contexts, few-shot generation by sampling."""

    name = "statistician"
    classification_only = True
    Config = StatisticianConfig
    # runs saved before these options existed trained the paper's plain networks
    legacy_defaults = {"conv_norm": "none", "sample_dropout": 0.0}

    def __init__(self, config: StatisticianConfig = StatisticianConfig()):
        super().__init__()
        self.config = config
        cfg = config
        self.encoder = SharedEncoder(cfg.filters, cfg.conv_norm)
        features = self.encoder.features
        self.statistic = StatisticNetwork(features, cfg.hidden_dim, cfg.context_dim, counted=cfg.sample_dropout > 0)
        self.inference = nn.ModuleList(GaussianLayer(features, cfg.context_dim, cfg.latent_dim, cfg.hidden_dim, l > 0)
                                       for l in range(cfg.latent_layers))
        self.latent_decoders = nn.ModuleList(GaussianLayer(0, cfg.context_dim, cfg.latent_dim, cfg.hidden_dim, l > 0)
                                             for l in range(cfg.latent_layers))
        self.decoder = ObservationDecoder(cfg.latent_layers * cfg.latent_dim, cfg.context_dim, cfg.hidden_dim,
                                          cfg.filters, cfg.conv_norm)
        self.step = 0

    @classmethod
    def build(cls, config: StatisticianConfig, problem: Problem) -> "NeuralStatistician":
        """The Neural Statistician with the paper's Omniglot networks. Refuses a regression
        problem and images of another shape than 1 x 28 x 28."""
        cls.require_classification(problem)
        if tuple(problem.input_shape) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise OptionError(f"statistician's networks are the paper's for 1x{IMAGE_SIZE}x{IMAGE_SIZE} images "
                              f"({{shape}}), got {'x'.join(map(str, problem.input_shape))}",
                              shape=(f"channels=1, image_size={IMAGE_SIZE}", f"--channels 1 --image-size {IMAGE_SIZE}"))
        return cls(config)

    # The paper's split (vinyals) and sets of 5 images of one character in training (its
    # Omniglot experiments; a set of one image cannot tell the context c from the image's own latent z); the
    # few-shot test in 1-shot episodes with 5 queries per class, as the reproduction runs
    task_defaults = {"split": "vinyals", "shots": 5, "query": 1, "test_shots": 1, "test_query": 5}

    @classmethod
    def paper_defaults(cls, task, given: dict | None = None) -> tuple[dict, dict]:
        # Section 5.4 and appendix B.1: sets of 5 images of one character, about 32 sets per
        # update (a 5-way task gives 5 sets), 1000 test episodes. The paper trains for a number of
        # epochs it does not state in steps; 50,000 updates of 30 sets see each of the vinyals
        # split's 4112 training classes (rotations included) about 360 times. Adam at 1e-4, batch
        # norm after every convolution and sample dropout 0.2, as the public re-implementation
        # that reports near-paper accuracy (ashysheya/neural-stat) trains: with 1e-3
        # and no normalisation the KL terms spiked and the context collapsed to chance within
        # 1000 steps, and without the decoder's batch norm the context faded after a thousand
        # steps (docs/methods/statistician.md). Gradients are clipped elementwise to [-0.5, 0.5]
        # as both public re-implementations do.
        return ({}, {"meta_batch_size": max(1, round(32 / max(task.ways, 1))), "meta_lr": 1e-4, "steps": 50000,
                     "grad_clip": 0.5, "eval_episodes": 1000, "val_every": 1000, "val_episodes": 200,
                     "checkpoint_every": 500})

    def start_step(self, step: int) -> None:
        self.step = step

    def chunking_refused(self) -> str | None:
        if self.config.conv_norm == "batch":
            return "statistician with --conv-norm batch (its statistics span the whole meta-batch)"
        return None

    # -- sets ----------------------------------------------------------------------------------

    @staticmethod
    def support_sets(batch: TaskBatch) -> Tensor:
        """Each class's support images as one set: (tasks, ways*shots, ...) -> (tasks*ways, shots, ...),
        tasks first, classes in label order. Every class needs the same number of shots."""
        if batch.support_x.shape[1] == 0:
            raise MetalearnError("statistician: a set needs at least one image; these tasks have no support images")
        ways = batch.ways or int(batch.support_y.max()) + 1
        labels = batch.support_y
        if bool((labels < 0).any()) or bool((labels >= ways).any()):
            raise MetalearnError(f"statistician: support labels must lie in 0..{ways - 1} (ways={ways}); got labels "
                                 f"from {int(labels.min())} to {int(labels.max())}")
        counts = F.one_hot(labels, ways).sum(dim=1)  # (tasks, ways)
        uneven = ((counts != counts[0, 0]).any(dim=1) | (counts == 0).any(dim=1)).nonzero()
        if len(uneven):
            task = int(uneven[0, 0])
            raise MetalearnError("statistician: every class of a task needs the same number (at least one) of "
                                 f"support images to form its set; got {counts[task].tolist()} per class in task "
                                 f"{task}" + (f" (task 0 has {counts[0].tolist()})" if task else ""))
        order = batch.support_y.argsort(dim=1, stable=True)
        x = torch.take_along_dim(batch.support_x, order.view(*order.shape, 1, 1, 1), dim=1)
        return x.reshape(-1, int(counts[0, 0]), *batch.support_x.shape[2:])

    def _check_batch(self, batch: TaskBatch, training: bool = False) -> None:
        """A batch as TaskBatch's contract says (:func:`~metalearn.algorithms.base.check_task_batch`),
        of 1x28x28 images."""
        check_task_batch(self.name, batch, training=training)
        self._check_images(batch.support_x)

    def _check_images(self, sets: Tensor) -> None:
        if sets.dim() != 5 or tuple(sets.shape[2:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise MetalearnError(f"statistician takes sets of 1x{IMAGE_SIZE}x{IMAGE_SIZE} images, shaped (sets, n, 1, "
                                 f"{IMAGE_SIZE}, {IMAGE_SIZE}); got {tuple(sets.shape)}")
        weights = next(self.parameters()).dtype
        if sets.dtype != weights:  # torch would fail inside the first convolution
            raise MetalearnError(f"statistician: the images are {sets.dtype} and the networks' weights {weights}; give "
                                 f"{weights} images with values in [0, 1] (images.to({weights}), divided by 255 if "
                                 "they are bytes)")
        if sets.shape[1] == 0:
            raise MetalearnError("statistician: a set needs at least one image, got a set of size 0")

    def context(self, sets: Tensor) -> tuple[Tensor, Tensor]:
        """q(c | D) of each set, from images binarised at 0.5: (sets, n, 1, 28, 28) -> mean,
        logvar (sets, context_dim)."""
        self._check_images(sets)
        x = (sets > 0.5).to(sets.dtype).flatten(0, 1)
        h = torch.cat([self.encoder(part) for part in x.split(IMAGES_PER_PASS)])
        return self.statistic(h.view(*sets.shape[:2], h.shape[-1]))  # also for no sets (no queries)

    # -- the bound (section 3) ------------------------------------------------------------------

    def set_noise(self, sets: Tensor, step: int, binarize: bool, training: bool = False) -> dict[str, Tensor]:
        """The noise of each set: uniforms for its binarisation (sets, n, 1, H, W) (when
        ``binarize``: dynamic binarisation in training), standard normals for c (sets,
        context_dim) and for z (sets, n, L, latent_dim); with ``training`` (the training bound
        only, whatever the binarisation): with sample dropout the mask "keep" (sets, n) of the
        images that enter the statistic (the first always does), and the boolean masks "dilate"
        (sets, n) of the images to dilate when ``dilate`` > 0 and "reflect" (sets,) of the sets
        to mirror when ``reflect`` > 0.

        Drawn from one generator per set seeded by the set's pixels and ``step``: a set gets the
        same noise whichever batch or rank it is in, so the distributed meta-gradient is the one
        process's. The augmentation masks are drawn after everything else and only when their
        probability is above 0, so the other noise is the same with and without them, and a
        learner with probability 0 draws (and trains) exactly as one without the options.
        The loop is over sets for the random draws only (a few tens per step)."""
        n, pixels = sets.shape[1], sets[0].numel()
        cfg = self.config
        codes = torch.round(sets.detach().flatten(1) * 255).to(torch.int64)
        weights = torch.randint(1, 2**31 - 1, (pixels,), generator=torch.Generator().manual_seed(0)).to(codes.device)
        keys = ((codes * weights).sum(-1) % (2**61 - 1)).tolist()
        uniforms, context, latent, keep, dilate, reflect = [], [], [], [], [], []
        drop = cfg.sample_dropout if training else 0.0
        p_dilate, p_reflect = (cfg.dilate, cfg.reflect) if training else (0.0, 0.0)
        # drawn in float32 whatever torch's default dtype (a float64 default draws other numbers from
        # the same generator), then converted to the sets' type: a set's noise is the same in every process
        f32 = torch.float32
        for key in keys:
            g = torch.Generator().manual_seed((key * 1_000_003 + step * 7_919 + 17) % 2**62)
            if binarize:
                uniforms.append(torch.rand(pixels, generator=g, dtype=f32))
            context.append(torch.randn(cfg.context_dim, generator=g, dtype=f32))
            latent.append(torch.randn(n, cfg.latent_layers, cfg.latent_dim, generator=g, dtype=f32))
            if drop > 0:
                keep.append(torch.cat([torch.ones(1, dtype=f32), (torch.rand(n - 1, generator=g, dtype=f32) >= drop)
                                       .to(f32)]))
            if p_dilate > 0:  # rand is in [0, 1): probability 1 dilates every image
                dilate.append(torch.rand(n, generator=g, dtype=f32) < p_dilate)
            if p_reflect > 0:
                reflect.append(torch.rand(1, generator=g, dtype=f32) < p_reflect)
        to = dict(device=sets.device, dtype=sets.dtype)
        noise = {"c": torch.stack(context).to(**to), "z": torch.stack(latent).to(**to)}
        if keep:
            noise["keep"] = torch.stack(keep).to(**to)
        if binarize:
            noise["u"] = torch.stack(uniforms).view_as(sets).to(**to)
        if dilate:
            noise["dilate"] = torch.stack(dilate).to(sets.device)
        if reflect:
            noise["reflect"] = torch.cat(reflect).to(sets.device)
        return noise

    def training_sets(self, raw: Tensor, noise: dict[str, Tensor]) -> Tensor:
        """The images a training set enters the bound with: the raw intensities (sets, n, 1, 28,
        28), each set mirrored left-right where ``noise["reflect"]`` says so, each image dilated
        (:func:`dilate_images`) where ``noise["dilate"]`` says so, then binarised (dynamically
        against ``noise["u"]``, or at 0.5 with ``binarize`` threshold). Augmentation comes before
        binarisation, as in ``ashysheya/neural-stat``, so a dilated stroke's grey edge is drawn
        as a Bernoulli pixel too. Reflection and this dilation commute (the cross is symmetric)."""
        x = raw
        if "reflect" in noise:
            x = torch.where(noise["reflect"].view(-1, 1, 1, 1, 1), x.flip(-1), x)
        if "dilate" in noise:
            x = torch.where(noise["dilate"].view(*x.shape[:2], 1, 1, 1), dilate_images(x), x)
        if self.config.binarize == "dynamic":
            return (noise["u"] < x).to(raw.dtype)
        return (x > 0.5).to(raw.dtype)

    def bound_terms(self, sets: Tensor, noise: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """One-sample estimates of the terms of each set's bound (section 3, eq. 8-10), each (sets,):
        ``log_likelihood`` R_D = sum_x log p(x | z, c), ``kl_context`` C_D = KL(q(c|D) || p(c)),
        ``kl_latent`` L_D = sum_x sum_l KL(q(z_l | z_{l-1}, x, c) || p(z_l | z_{l-1}, c)).
        ``sets``: (sets, n, 1, 28, 28) images in {0, 1}; ``noise``: the standard normals "c"
        (sets, context_dim) and "z" (sets, n, L, latent_dim) (default: drawn from torch's generator)."""
        self._check_images(sets)
        cfg = self.config
        if noise is None:
            noise = {"c": torch.randn(sets.shape[0], cfg.context_dim, device=sets.device, dtype=sets.dtype),
                     "z": torch.randn(*sets.shape[:2], cfg.latent_layers, cfg.latent_dim, device=sets.device,
                                      dtype=sets.dtype)}
        h = self.encoder(sets.flatten(0, 1)).view(*sets.shape[:2], -1)  # (sets, n, features)
        c_mean, c_logvar = self.statistic(h, noise.get("keep"))
        c = (c_mean + (0.5 * c_logvar).exp() * noise["c"]).unsqueeze(1)  # (sets, 1, context_dim)
        zs, kl_latent, z = [], 0.0, None
        for l in range(cfg.latent_layers):
            q_mean, q_logvar = self.inference[l](c, h, z)
            p_mean, p_logvar = self.latent_decoders[l](c, None, z)
            kl_latent = kl_latent + gaussian_kl(q_mean, q_logvar, p_mean, p_logvar).sum(-1)
            z = q_mean + (0.5 * q_logvar).exp() * noise["z"][:, :, l]
            zs.append(z)
        logits = self.decoder(torch.cat(zs, dim=-1), c)
        return {"log_likelihood": bernoulli_log_likelihood(logits, sets).sum(-1),
                "kl_context": standard_normal_kl(c_mean, c_logvar), "kl_latent": kl_latent}

    def alpha(self, step: int) -> float:
        """The reweighting a of step ``step``: ``reweight_alpha`` halved every ``alpha_halve_every`` steps."""
        return self.config.reweight_alpha * 0.5 ** (step // self.config.alpha_halve_every)

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The negative (reweighted) lower bound in nats per image, averaged over the batch's
        support sets; metrics: ``bound`` (the plain bound, nats per image), its terms
        ``reconstruction`` (-R_D/n), ``kl_context`` (C_D/n), ``kl_latent`` (L_D/n), and the KL
        classifier's ``accuracy`` on the batch's queries."""
        self._check_batch(batch, training=True)
        raw = self.support_sets(batch)
        self._check_images(raw)
        noise = self.set_noise(raw, self.step, self.config.binarize == "dynamic", training=True)
        sets = self.training_sets(raw, noise)
        terms = self.bound_terms(sets, noise)
        n = sets.shape[1]
        r, kc, kz = terms["log_likelihood"] / n, terms["kl_context"] / n, terms["kl_latent"] / n
        weight = 1.0 + self.alpha(self.step)
        loss = -(weight * r - (kc + kz) / weight).mean()
        metrics = {"loss": loss.detach(), "bound": (r - kc - kz).mean().detach(),
                   "reconstruction": -r.mean().detach(), "kl_context": kc.mean().detach(),
                   "kl_latent": kz.mean().detach()}
        if batch.query_x.shape[1]:
            with evaluating(self), torch.no_grad():  # as evaluation classifies: running batch-norm statistics
                logits = self.logits(batch)
            metrics["accuracy"] = (logits.argmax(-1) == batch.query_y).float().mean()
        return loss, metrics

    # -- few-shot classification (section 5.4, Algorithm 1) -------------------------------------

    def logits(self, batch: TaskBatch) -> Tensor:
        """-D_KL between each class's q(c | D_i) and each query's q(c | {x}), in the configured
        direction: (tasks, n_query, ways). A batch that breaks TaskBatch's contract is refused in
        one line (:func:`~metalearn.algorithms.base.check_task_batch`)."""
        self._check_batch(batch)
        tasks, n_query = batch.query_x.shape[:2]
        class_mean, class_logvar = self.context(self.support_sets(batch))  # (tasks*ways, d)
        query_mean, query_logvar = self.context(batch.query_x.reshape(tasks * n_query, 1, *batch.query_x.shape[2:]))
        class_mean, class_logvar = (t.view(tasks, 1, -1, t.shape[-1]) for t in (class_mean, class_logvar))
        query_mean, query_logvar = (t.view(tasks, n_query, 1, t.shape[-1]) for t in (query_mean, query_logvar))
        if self.config.kl_direction == "support-query":
            kl = gaussian_kl(class_mean, class_logvar, query_mean, query_logvar)
        else:
            kl = gaussian_kl(query_mean, query_logvar, class_mean, class_logvar)
        return -kl

    def predict(self, batch: TaskBatch) -> Tensor:
        """The KL classifier (section 5.4), without gradients: minus the KL divergence between
        each class's context posterior q(c | support images) and each query's q(c | {x}), in the
        configured direction, as logits (tasks, n_query, ways)."""
        with torch.no_grad():
            return self.logits(batch)

    # -- few-shot generation ---------------------------------------------------------------------

    def sample(self, support_images: Tensor, num: int = 20, generator: torch.Generator | None = None) -> Tensor:
        """New images of the character(s) shown: c ~ q(c | D), then for each new image z ~ p(z | c)
        and the Bernoulli means of p(x | z, c) (the paper's conditional samples, figure 5).

        support_images: one set (n, 1, 28, 28) or several (sets, n, 1, 28, 28), values in [0, 1]
        -> (sets, num, 1, 28, 28) in [0, 1]. One c is drawn per set. ``generator``: a CPU
        generator for the noise (default torch's), so a seed gives the same images on any device.

        ``num`` is a whole number from 1 to :data:`MAX_SAMPLES` (1000) per set; the images are
        decoded :data:`IMAGES_PER_PASS` at a time, so memory is bounded by the pass, and the
        images are the same whatever the pass (all noise is drawn before decoding)."""
        sets = support_images.unsqueeze(0) if support_images.dim() == 4 else support_images
        self._check_images(sets)
        if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= MAX_SAMPLES:
            raise MetalearnError(f"statistician.sample: num must be a whole number from 1 to {MAX_SAMPLES} (new "
                                 f"images per set), got {num!r}")
        cfg = self.config
        # float32 draws whatever torch's default dtype: a seed gives the same images in any process
        draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float32).to(  # noqa: E731
            sets.device, sets.dtype)
        with evaluating(self), torch.no_grad():
            c_mean, c_logvar = self.context(sets)
            c = (c_mean + (0.5 * c_logvar).exp() * draw(*c_mean.shape)).unsqueeze(1)
            zs, z = [], None
            for l in range(cfg.latent_layers):
                mean, logvar = self.latent_decoders[l](c, None, z)
                mean, logvar = mean.expand(-1, num, -1), logvar.expand(-1, num, -1)
                z = mean + (0.5 * logvar).exp() * draw(sets.shape[0], num, cfg.latent_dim)
                zs.append(z)
            z = torch.cat(zs, dim=-1)  # (sets, num, L * latent_dim): small; the decoder's maps are not
            per_pass = max(1, IMAGES_PER_PASS // sets.shape[0])  # new images of every set in one pass
            return torch.cat([torch.sigmoid(self.decoder(part, c)) for part in z.split(per_pass, dim=1)], dim=1)

    def test_bound(self, source, episodes: int = 100, seed: int = 0, chunk: int = 50) -> dict[str, float]:
        """The lower bound (nats per image, one sample of c and z per set, images binarised at
        0.5) over the support sets of ``episodes`` episodes of ``source`` drawn from ``seed``,
        ``chunk`` at a time: with :func:`metalearn.evaluation.evaluate`'s seed and chunk, the
        first ``episodes`` of the episodes it scores. ``episodes`` and ``chunk`` below 1 (or not
        whole numbers) are refused in one line, as :func:`~metalearn.evaluation.evaluate` refuses
        them: no episode would leave a bound of 0 / 0."""
        episodes = check_count(episodes, "test_bound: episodes")
        chunk = check_count(chunk, "test_bound: chunk")
        generator = torch.Generator().manual_seed(seed)
        device, weights = next(self.parameters()).device, next(self.parameters()).dtype
        totals, count = torch.zeros(4, dtype=torch.float64), 0
        with evaluating(self), torch.no_grad():
            remaining = episodes
            while remaining > 0:
                size = min(chunk, remaining)
                batch = source.sample(size, generator).to(device)
                # binarised: 0 and 1 are exact in any type, so the sets take the networks' (float64, bfloat16)
                sets = (self.support_sets(batch) > 0.5).to(weights)
                terms = self.bound_terms(sets, self.set_noise(sets, 0, binarize=False))
                n = sets.shape[1]
                r, kc, kz = terms["log_likelihood"] / n, terms["kl_context"] / n, terms["kl_latent"] / n
                totals += torch.stack([(r - kc - kz).sum(), -r.sum(), kc.sum(), kz.sum()]).double().cpu()
                count += sets.shape[0]
                remaining -= size
        bound, reconstruction, kl_context, kl_latent = (float(v) for v in totals / count)
        return {"bound_nats_per_image": bound, "reconstruction": reconstruction, "kl_context": kl_context,
                "kl_latent": kl_latent, "bound_sets": count, "bound_episodes": episodes}
