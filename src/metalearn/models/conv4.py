"""The four-block convolutional network of few-shot learning (Vinyals et al. 2016; Finn et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.errors import check_whole
from metalearn.models.norm import BatchStatNorm, batch_stat_norm, native_batch_norm_active, native_weight

# layers that act on each channel of a map on its own, so that they apply unchanged to the tasks
# folded into the channels by Conv4.forward_tasks
_PER_CHANNEL = (nn.ReLU, nn.LeakyReLU, nn.MaxPool2d)


def conv_block(in_channels: int, out_channels: int, pooling: str, norm_scale: bool = True,
               norm_eps: float = 1e-5, leaky: bool = False) -> nn.Sequential:
    """3x3 conv, batch norm on the current batch's statistics (no running statistics, as in the
    MAML reference code, so the block is a pure function of its parameters), ReLU; downsampled
    by a stride-2 convolution (``"stride"``, MAML) or a 2x2 max-pool (``"max"``, ProtoNets).
    ``norm_scale`` / ``norm_eps``: the batch norm's scale parameter and epsilon; ``leaky``: a
    leaky ReLU (slope 0.01) instead of the ReLU."""
    stride = 2 if pooling == "stride" else 1
    layers: list[nn.Module] = [
        # no conv bias: the batch norm right after subtracts the mean, so a bias could not change
        # any output; its gradient would be rounding noise that Adam amplifies into steps
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        BatchStatNorm(out_channels, eps=norm_eps, scale=norm_scale),
        nn.LeakyReLU() if leaky else nn.ReLU(),
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
    ``norm_scale`` / ``norm_eps`` / ``leaky``: see :func:`conv_block`.
    """

    def __init__(self, in_channels: int = 1, out_features: int | None = 5, hidden: int = 64,
                 pooling: str = "stride", norm_scale: bool = True, norm_eps: float = 1e-5,
                 flat_map: tuple[int, int] | None = None, leaky: bool = False):
        super().__init__()
        check_whole("Conv4", 1, in_channels=in_channels, hidden=hidden,
                    **({} if out_features is None else {"out_features": out_features}))
        if pooling not in ("stride", "max"):
            raise ValueError(f"pooling must be 'stride' or 'max', got {pooling!r}")
        self.features = nn.Sequential(*(
            conv_block(in_channels if i == 0 else hidden, hidden, pooling, norm_scale, norm_eps, leaky) for i in range(4)
        ))
        # flat_map (h, w): the head reads the flattened final feature map of that size (MAML's
        # mini-ImageNet network: 5x5x32 on 84x84) instead of its spatial mean
        self.flat_map = flat_map
        features = hidden * (flat_map[0] * flat_map[1] if flat_map else 1)
        self.head = nn.Linear(features, out_features) if out_features is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return self.head(features.flatten(-3) if self.flat_map else features.mean(dim=(-2, -1)))

    def can_forward_tasks(self) -> bool:
        """Whether :meth:`forward_tasks` computes what :meth:`forward` does: not with MAML++'s
        per-step batch-norm sets (chosen by the inner step, with running statistics), which it
        does not model, nor with layers it does not know."""
        for module in self.features.modules():
            if isinstance(module, BatchStatNorm) and module.steps:
                return False
            if not isinstance(module, (nn.Sequential, nn.Conv2d, BatchStatNorm, *_PER_CHANNEL)):
                return False
        return isinstance(self.head, (nn.Linear, nn.Identity))

    def forward_tasks(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """:meth:`forward` for a batch of tasks at once, each with its own weights, as a pure
        function of ``params`` (every parameter name -> a tensor with a leading task axis,
        ``(tasks, *shape)``). x: ``(tasks, batch, C, H, W)`` -> ``(tasks, batch, out_features)``.

        The tasks are folded into the channels: task t owns channels ``t*C .. t*C + C-1`` of one
        ``(batch, tasks*C, H, W)`` map, every convolution is grouped by task (``groups=tasks``),
        and torch's native batch norm on that map normalises each task's channels with that
        task's own batch statistics, as :class:`BatchStatNorm` does for one task. This is the
        grouped convolution that ``vmap`` makes of a convolution, without moving the task axis
        into the channels and back around every layer. The batch norm is chosen as
        :class:`BatchStatNorm` chooses it: the native kernel without gradients or inside
        :func:`~metalearn.models.norm.native_batch_norm` (whose second derivative is right here,
        outside ``vmap``), else the decomposed form. Equal to :meth:`forward` on each task with
        its own weights (tests/test_maml.py)."""
        tasks, batch = x.shape[:2]
        h = x.transpose(0, 1).reshape(batch, tasks * x.shape[2], *x.shape[3:])
        for i, block in enumerate(self.features):
            for j, layer in enumerate(block):
                prefix = f"features.{i}.{j}."
                if isinstance(layer, nn.Conv2d):
                    weight = params[prefix + "weight"]
                    bias = params[prefix + "bias"].reshape(-1) if layer.bias is not None else None
                    h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), bias, layer.stride, layer.padding,
                                 layer.dilation, layer.groups * tasks)
                elif isinstance(layer, BatchStatNorm):
                    weight = params[prefix + "weight"].reshape(-1) if layer.weight is not None else None
                    bias = params[prefix + "bias"].reshape(-1)
                    if native_batch_norm_active(h):
                        h = F.batch_norm(h, None, None, native_weight(weight, h), bias, True, 0.0, layer.eps)
                    else:
                        h = batch_stat_norm(h, weight, bias, layer.eps)
                else:
                    h = layer(h)
        # (batch, tasks * C, h, w) -> (batch, tasks, features): each task's channels are contiguous
        # (sizes spelt out rather than -1: a batch of 0 examples, an empty query set, has none to infer)
        channels = h.shape[1] // tasks
        features = (h.reshape(batch, tasks, channels * h.shape[-2] * h.shape[-1]) if self.flat_map
                    else h.mean(dim=(-2, -1)).view(batch, tasks, channels))
        if isinstance(self.head, nn.Identity):
            return features.transpose(0, 1)
        out = torch.einsum("btf,tof->tbo", features, params["head.weight"])
        return out + params["head.bias"][:, None] if self.head.bias is not None else out


def reference_conv4(in_channels: int = 1, out_features: int = 5, hidden: int = 64) -> Conv4:
    """The MAML Omniglot network as the authors' code (cbfinn/maml) builds it, where it differs
    from :class:`Conv4`'s PyTorch defaults: batch norm without a scale and with epsilon 1e-3
    (``tf.contrib.layers.batch_norm``'s defaults), Xavier-uniform convolution weights, and head
    weights drawn from a standard normal (``tf.random_normal``), about 14 times PyTorch's default,
    so the initial logits are that much larger. (The reference code's conv biases are left out
    here as in Conv4: the batch norm cancels them. TensorFlow's ``SAME`` padding of a stride-2
    convolution on an even size pads only the bottom and right, PyTorch's ``padding=1`` both
    sides: the same output sizes on a grid shifted by one pixel; not reproduced. Its inner loop
    does not adapt the batch-norm offsets: that is MAML's ``adapt_norm=False``, an option of the
    method, not of the network.)"""
    model = Conv4(in_channels, out_features, hidden, pooling="stride", norm_scale=False, norm_eps=1e-3)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
    nn.init.normal_(model.head.weight, std=1.0)
    nn.init.zeros_(model.head.bias)
    return model


def mamlpp_conv4(in_channels: int = 1, out_features: int = 5, hidden: int = 64) -> Conv4:
    """The Omniglot network of MAML++ (Antoniou, Edwards & Storkey 2019, section 5; their code's
    ``VGGReLUNormNetwork`` with ``max_pooling``): four blocks of a 3x3 convolution of 64 filters
    (stride 1, padding 1), batch norm with scale and offset, leaky ReLU and 2x2 max-pooling
    (28 -> 14 -> 7 -> 3 -> 1), then a linear head; Xavier-uniform convolution and head weights,
    zero head bias. (Their convolutions have a bias, which a batch norm on batch statistics
    cancels and whose meta-gradient is therefore zero, so it stays at its initial 0: left out
    here, as in :class:`Conv4`.) The per-step batch norm of MAML++ is an option of the method
    (MAML's ``per_step_bn_weights`` / ``per_step_bn_statistics``), not of the network."""
    model = Conv4(in_channels, out_features, hidden, pooling="max", leaky=True)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
    nn.init.zeros_(model.head.bias)
    return model
