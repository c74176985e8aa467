"""The 12-layer residual network of few-shot learning on natural images, as MetaOptNet (Lee et
al. 2019, section 4.1) builds it: the design of TADAM (Oreshkin et al. 2018, section 4, with 64,
128, 256 and 512 filters and swish-1) widened to 64, 160, 320 and 640 filters with leaky ReLU,
the backbone of most later few-shot work and learn2learn's ``ResNet12``."""

from __future__ import annotations

from torch import Tensor, nn

from metalearn.errors import check_count
from metalearn.models.norm import BatchStatNorm

WIDTHS = (64, 160, 320, 640)  # the four blocks' filters in MetaOptNet
SLOPE = 0.1  # its leaky ReLU's negative slope


class ResidualBlock(nn.Module):
    """Three 3x3 convolutions, each followed by batch norm (on the current batch's statistics:
    :class:`~metalearn.models.BatchStatNorm`) and a leaky ReLU of slope 0.1, except that the
    third's activation comes after the residual sum; the shortcut is a 1x1 convolution and batch
    norm (the widths differ in every block); then a 2x2 max-pool, halving height and width
    (rounding down).

    x: (batch, in_channels, H, W) -> (batch, out_channels, H // 2, W // 2)
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # no conv bias: each convolution feeds a batch norm, whose mean subtraction would cancel
        # it; its gradient would be rounding noise that Adam amplifies into steps
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = BatchStatNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = BatchStatNorm(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = BatchStatNorm(out_channels)
        self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.shortcut_norm = BatchStatNorm(out_channels)
        # not in place: the network is applied as a pure function (functional_call, vmap)
        self.activation = nn.LeakyReLU(SLOPE)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.activation(self.norm1(self.conv1(x)))
        out = self.activation(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out)) + self.shortcut_norm(self.shortcut_conv(x))
        return self.pool(self.activation(out))


class ResNet12(nn.Module):
    """ResNet-12: four :class:`ResidualBlock` s of ``channels`` filters (64, 160, 320, 640 by
    default), global average pooling, then an optional linear head.

    x: (batch, in_channels, H, W) -> (batch, out_features), or (batch, channels[-1]) features
    when ``out_features`` is None (an embedding network for metric-based methods: 640-d by
    default). Each block halves the image, so inputs need at least 16x16 pixels: 84x84 ends in a
    5x5 map, 28x28 in a 1x1 map. With 3 input channels and the default widths the embedding
    network has 12,424,320 parameters, the 12.4 M that the literature gives for it; a head adds
    ``640 * out_features + out_features``.

    Where it differs from the reference implementations (MetaOptNet's, and learn2learn's
    ``l2l.vision.models.ResNet12`` taken from it): batch norm uses the current batch's
    statistics, without running statistics, so the network is a pure function of its parameters
    as every network of this library; the features are averaged over the whole final map (theirs:
    a 5x5 average pool, which fits 84x84 inputs only); and there is no DropBlock or dropout,
    which draw random masks of their own: a forward pass would then depend on a random stream
    that exact resume does not replay and that ``vmap`` over tasks does not split per task.
    Initialisation as theirs: convolutions Kaiming-normal (fan-out, gain sqrt(2), torch's
    ``kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu")`` with its default slope 0),
    batch-norm scales 1 and offsets 0, the head PyTorch's default.

    There is no task-batched forward (Conv4's ``forward_tasks``): MAML, PLATIPUS and Reptile
    apply it to every task at once with ``torch.func.vmap``.
    """

    def __init__(self, in_channels: int = 3, out_features: int | None = None,
                 channels: tuple[int, ...] = WIDTHS):
        super().__init__()
        def refused(_: str) -> ValueError:
            return ValueError(f"channels must be four whole numbers of filters, one per block, got {channels!r}")

        if len(channels) != 4:
            raise refused("")
        channels = tuple(check_count(c, "channels", error=refused) for c in channels)
        widths = (in_channels, *channels)
        self.blocks = nn.Sequential(*(ResidualBlock(widths[i], widths[i + 1]) for i in range(4)))
        self.head = nn.Linear(channels[-1], out_features) if out_features is not None else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="leaky_relu")

    @property
    def embedding_dim(self) -> int:
        """The size of the features the head reads (the embedding without a head)."""
        return self.blocks[-1].conv3.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x).mean(dim=(-2, -1)))
