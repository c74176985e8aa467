"""The regression network of MAML's sinusoid experiment (Finn et al. 2017, section 5.1)."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """in_features -> hidden... (ReLU) -> out_features. Default: 1 -> 40 -> 40 -> 1.

    x: (batch, in_features) -> (batch, out_features)
    """

    def __init__(self, in_features: int = 1, out_features: int = 1, hidden: tuple[int, ...] = (40, 40)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
