"""The regression network of MAML's sinusoid experiment (Finn et al. 2017, section 5.1)."""

from __future__ import annotations

from torch import Tensor, nn

from metalearn.errors import MetalearnError, check_whole


class MLP(nn.Module):
    """in_features -> hidden... (ReLU) -> out_features. Default: 1 -> 40 -> 40 -> 1.

    x: (batch, in_features) -> (batch, out_features); with ``out_features`` None no output
    layer: the last hidden layer's ReLU features, (batch, hidden[-1]), an embedding (the
    networks of ProtoNets and Matching Nets on tasks of vectors).
    """

    def __init__(self, in_features: int = 1, out_features: int | None = 1, hidden: tuple[int, ...] = (40, 40)):
        super().__init__()
        if not isinstance(hidden, (tuple, list)):
            raise MetalearnError(f"MLP's hidden is a tuple of layer widths, e.g. (40, 40), or (40,) for one layer, "
                                 f"got {hidden!r}")
        check_whole("MLP", 1, in_features=in_features, **({} if out_features is None else
                                                           {"out_features": out_features}))
        for size in hidden:
            try:
                check_whole("MLP", 1, width=size)
            except MetalearnError:
                raise MetalearnError(f"MLP's hidden holds layer widths, whole numbers of at least 1, got "
                                     f"{tuple(hidden)!r}") from None
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        if out_features is not None:
            layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
