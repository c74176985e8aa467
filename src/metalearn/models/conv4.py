"""The four-block convolutional network of few-shot learning (Vinyals et al. 2016; Finn et al. 2017)."""

from __future__ import annotations

from torch import Tensor, nn

from metalearn.models.norm import BatchStatNorm


def conv_block(in_channels: int, out_channels: int, pooling: str) -> nn.Sequential:
    """3x3 conv, batch norm on the current batch's statistics (no running statistics, as in the
    MAML reference code, so the block is a pure function of its parameters), ReLU; downsampled
    by a stride-2 convolution (``"stride"``, MAML) or a 2x2 max-pool (``"max"``, ProtoNets)."""
    stride = 2 if pooling == "stride" else 1
    layers: list[nn.Module] = [
        # no conv bias: the batch norm right after subtracts the mean, so a bias could not change
        # any output; its gradient would be rounding noise that Adam amplifies into steps
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        BatchStatNorm(out_channels),
        nn.ReLU(),
    ]
    if pooling == "max":
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four conv blocks of ``hidden`` filters, spatially averaged, then an optional linear head.

    x: (batch, channels, H, W) -> (batch, out_features), or (batch, hidden) features when
    ``out_features`` is None (an embedding for metric-based methods). With ``pooling="stride"``
    this is the MAML Omniglot network (the reference code averages the final feature map);
    ``pooling="max"`` is the max-pool variant (on 28x28 the map is 1x1, a 64-d embedding).
    """

    def __init__(self, in_channels: int = 1, out_features: int | None = 5, hidden: int = 64,
                 pooling: str = "stride"):
        super().__init__()
        if pooling not in ("stride", "max"):
            raise ValueError(f"pooling must be 'stride' or 'max', got {pooling!r}")
        self.features = nn.Sequential(
            conv_block(in_channels, hidden, pooling),
            conv_block(hidden, hidden, pooling),
            conv_block(hidden, hidden, pooling),
            conv_block(hidden, hidden, pooling),
        )
        self.head = nn.Linear(hidden, out_features) if out_features is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))
