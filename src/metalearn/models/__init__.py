"""Networks: plain ``nn.Module`` s with no running-statistics buffers, so that a method can
apply them as pure functions of a parameter dict (``torch.func.functional_call``). (MAML's
per-step batch-norm statistics are buffers that only the method's own update writes.)

Every network a run can name is one :class:`Network` entry in ``NETWORKS``: its builder, what
it can serve as (a classifier, with an output layer; an embedding, without one; or both), the
inputs it takes, and one line that describes it. The methods' ``model`` options take their help
and their name checks from the registry (:func:`network_names`, :func:`network_help`,
:func:`check_network_name`), so adding a network is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from metalearn.errors import ConfigError, MetalearnError, OptionError, check_count
from metalearn.options import is_command_name
from metalearn.plugins import load_plugins, unknown_hint, registering
from metalearn.models.conv4 import Conv4, mamlpp_conv4, reference_conv4
from metalearn.models.mlp import MLP
from metalearn.models.norm import BatchStatNorm, batch_stat_norms, first_order_batch_norm
from metalearn.models.resnet12 import ResNet12

ROLES = ("classifier", "embedding")


@dataclass(frozen=True)
class Network:
    """One network a run can name. ``build(input_shape, out_features)`` returns the module for
    inputs of ``input_shape`` (without the batch axis; ``(C, H, W)`` for images, ``(features,)``
    for vectors) with ``out_features`` outputs, or, given None, without an output layer (an
    embedding). ``classifier`` / ``embedding``: whether it can be built with / without an output
    layer (one output per class, or the regression targets: a "classifier" here is any network
    with one; the methods that adapt the network's outputs need the first: MAML, PLATIPUS, Reptile;
    those that compare embeddings the second: ProtoNets, Matching Nets, the Memory Module).
    ``inputs``: ``"image"`` or ``"vector"``, and ``min_side`` the fewest pixels of an image's
    height and width (16 for four 2x2 halvings), both checked before ``build`` is called.
    ``description``: one line for the documentation; ``note``: a few words that the methods'
    option help adds after the name (empty: the name alone)."""

    name: str
    build: Callable[[tuple[int, ...], int | None], nn.Module]
    classifier: bool
    embedding: bool
    inputs: str
    description: str
    note: str = ""
    min_side: int = 1

    def can_serve(self, role: str) -> bool:
        """Whether the network can serve as a ``"classifier"`` or an ``"embedding"``."""
        return self.classifier if role == "classifier" else self.embedding


HALVED = 16  # the smallest side that four 2x2 halvings (max-pools) leave at least one pixel of


def _halved_map(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """The final map's (height, width) after four 2x2 max-pools of a ``(C, H, W)`` image, each
    rounding down: 1x1 on 28x28, 5x5 on 84x84."""
    side = lambda n: n // 2 // 2 // 2 // 2
    return side(input_shape[1]), side(input_shape[2])


def _conv4_maxpool_32(input_shape: tuple[int, ...], out_features: int | None) -> nn.Module:
    return Conv4(input_shape[0], out_features, hidden=32, pooling="max", flat_map=_halved_map(input_shape))


def _conv4_flat(input_shape: tuple[int, ...], out_features: int | None) -> nn.Module:
    # the encoder of Snell et al.'s code (jakesnell/prototypical-networks, protonets/models/
    # few_shot.py): four max-pool blocks of 64 filters, then Flatten(); conv4-embedding's
    # parameters, under the same names
    return Conv4(input_shape[0], out_features, pooling="max", flat_map=_halved_map(input_shape))


NETWORKS: dict[str, Network] = {network.name: network for network in (
    Network("conv4", lambda shape, out: Conv4(shape[0], out, pooling="stride"), True, True, "image",
            "MAML's Omniglot network: 4 blocks of a 3x3 convolution of 64 filters with stride 2, batch norm and "
            "ReLU, the final map averaged (64-d)"),
    Network("conv4-maxpool", lambda shape, out: Conv4(shape[0], out, pooling="max"), True, True, "image",
            "conv4 with stride 1 and a 2x2 max-pool in each block (at least 16x16 inputs; 64-d)",
            min_side=HALVED),
    Network("conv4-embedding", lambda shape, out: Conv4(shape[0], out, pooling="max"), False, True, "image",
            "conv4-maxpool without an output layer: a 64-d embedding, the final map averaged; ProtoNets' and "
            "Matching Nets' at 28x28", min_side=HALVED),
    Network("conv4-flat", _conv4_flat, False, True, "image",
            "conv4-embedding with the final map flattened, as ProtoNets' code ends its encoder (Snell et al. 2017): "
            "64-d at 28x28, 1600-d (5x5x64) at 84x84", "ProtoNets' embedding on photographs", min_side=HALVED),
    Network("conv4-maxpool-32", _conv4_maxpool_32, True, True, "image",
            "MAML's mini-ImageNet network (Finn et al. 2017, section 5.2): 32 filters, max-pooling, the head on "
            "the flattened final map (5x5x32 on 84x84)", "mini-ImageNet's", min_side=HALVED),
    Network("conv4-mamlpp", lambda shape, out: mamlpp_conv4(shape[0], out), True, False, "image",
            "MAML++'s Omniglot network: max-pooling, leaky ReLU, Xavier-uniform weights "
            "(metalearn.models.mamlpp_conv4)", "MAML++'s", min_side=HALVED),
    Network("conv4-reference", lambda shape, out: reference_conv4(shape[0], out), True, False, "image",
            "conv4 as the MAML authors' code builds and initialises it (metalearn.models.reference_conv4)",
            "conv4 as the MAML authors' code builds it"),
    Network("resnet12", lambda shape, out: ResNet12(shape[0], out), True, True, "image",
            "ResNet-12 as MetaOptNet builds it (Lee et al. 2019): 4 residual blocks of 64, 160, 320 and 640 filters, "
            "averaged into a 640-d embedding; 12.4 M weights, far slower than conv4 (metalearn.models.ResNet12)",
            "ResNet-12: 12.4 M weights, far slower than conv4", min_side=HALVED),
    Network("mlp", lambda shape, out: MLP(shape[0], out), True, True, "vector",
            "MAML's sinusoid regression network: 2 hidden layers of 40 units with ReLU (as an embedding: the 40 "
            "features of the last; the default on tasks of vectors)"),
)}
"""Every network a run can name (the methods' ``model`` option), in the order the option help
lists them; :func:`register_network` adds to it."""
BUILT_IN_NETWORKS = frozenset(NETWORKS)


def register_network(network: Network) -> Network:
    """Make ``network`` known under ``network.name`` to :func:`build_model` and the methods'
    ``model`` options (their help, written when the methods are imported, lists the built-in
    networks). A second registration under a name replaces the first; one that replaces a
    built-in network warns. Registered in a plugin's module (:mod:`metalearn.plugins`), the
    network is known to every process that reads its runs. Returns ``network``."""
    if not is_command_name(network.name):
        raise MetalearnError(f"a network's name must be a command-line name: lower-case letters, digits, '-', '_' "
                             f"or '+', got {network.name!r}")
    if not (network.classifier or network.embedding):
        raise MetalearnError(f"network {network.name} must serve as a classifier, an embedding or both")
    if network.inputs not in ("image", "vector"):
        raise MetalearnError(f"network {network.name}: inputs must be 'image' or 'vector', got {network.inputs!r}")
    check_count(network.min_side, f"network {network.name}: min_side",
                message="{name} must be a whole number of pixels >= 1, got {value!r}")
    registering("network", network.name, BUILT_IN_NETWORKS, NETWORKS.get(network.name) is network)
    NETWORKS[network.name] = network
    return network


def network_names(role: str | None = None, inputs: str | None = None) -> tuple[str, ...]:
    """The registered networks that can serve as ``role`` (``"classifier"``, ``"embedding"``;
    None: any) and take ``inputs`` (``"image"``, ``"vector"``; None: any), in registry order."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)} or None, got {role!r}")
    return tuple(name for name, network in NETWORKS.items()
                 if (role is None or network.can_serve(role)) and (inputs is None or network.inputs == inputs))


def _listed(names: tuple[str, ...], notes: bool) -> str:
    """``names`` as "a, b or c"; with ``notes``, each registered network's note after its name."""
    words = [f"{name} ({NETWORKS[name].note})" if notes and name in NETWORKS and NETWORKS[name].note else name
             for name in names]
    if len(words) < 2:
        return words[0] if words else "none"
    return f"{', '.join(words[:-1])} or {words[-1]}"


def network_help(role: str, inputs: str | None = None) -> str:
    """The networks that serve as ``role`` (and take ``inputs``), for a method's ``model``
    option help: "conv4, conv4-maxpool, conv4-maxpool-32 (mini-ImageNet's), ... or mlp"."""
    return _listed(network_names(role, inputs), notes=True)


def check_network_name(owner: str, name: str, role: str, inputs: str | None = None,
                       also: dict[str, str] | None = None) -> None:
    """Refuse, as a :class:`ConfigError` of field ``model`` of ``owner``, a ``name`` that is not a
    registered network serving as ``role`` (and taking ``inputs``) nor one of a method's own
    networks ``also`` (name -> a few words: the Memory Module's ``lenet``): one line that lists
    the valid ones and says what is wrong with a known network."""
    also = also or {}
    load_plugins()  # once per process: a plugin may register a network, or replace a built-in one
    valid = network_names(role, inputs)
    if name in also or name in valid:
        return
    listing = _listed((*(f"{own} ({note})" if note else own for own, note in also.items()), *valid), notes=False)
    what = ("a network with an output layer" if role == "classifier" else
            f"an {inputs} network" if inputs == "image" else "an embedding network")
    network = NETWORKS.get(name)
    if network is None:
        why = f"got {name!r} ({unknown_hint()})"
    elif inputs is not None and network.inputs != inputs:
        why = f"{name} takes {network.inputs} inputs"
    else:
        why = f"{name} has no output layer" if role == "classifier" else f"{name} is a classifier only"
    raise ConfigError(owner, "model", f"must be {what}: {listing}; {why}")


def build_model(name: str, input_shape: tuple[int, ...], out_features: int | None) -> nn.Module:
    """A network by name (a key of ``NETWORKS``) for inputs of ``input_shape`` (without the batch
    axis; ``input_shape[0]`` is the channel count of an image: 1 grey, 3 RGB).

    ``out_features`` None gives an embedding network (no output layer), for metric-based
    methods. Refused in one line: an unknown name (listing the valid ones), a network that cannot
    serve as what is asked (an embedding network for a method that needs an output layer, or the
    reverse), inputs of the wrong kind or too small.
    """
    load_plugins()  # once per process: a plugin may register a network, or replace a built-in one
    network = NETWORKS.get(name)
    if network is None:
        raise MetalearnError(f"unknown model {name!r}; valid models: {', '.join(NETWORKS)} ({unknown_hint()})")
    # the networks to name instead: those of the same kind of inputs, else any
    if out_features is not None and not network.classifier:
        instead = network_names("classifier", network.inputs) or network_names("classifier")
        raise MetalearnError(f"{name} has no output layer; this method needs one of {', '.join(instead)}")
    if out_features is None and not network.embedding:
        instead = network_names("embedding", network.inputs) or network_names("embedding")
        raise MetalearnError(f"{name} is a classifier ({network.note or network.description}); use an embedding "
                             f"network here: {', '.join(instead)}")
    if (network.inputs == "image") != (len(input_shape) == 3) or (network.inputs == "vector") != (
            len(input_shape) == 1):
        kind = "image (C, H, W)" if network.inputs == "image" else "vector"
        fitting = [other for other in NETWORKS if NETWORKS[other].inputs != network.inputs
                   and NETWORKS[other].can_serve("classifier" if out_features is not None else "embedding")]
        listed = fitting[0] if len(fitting) == 1 else f"one of {', '.join(fitting)}"
        instead = f"; give {{model}} {listed}" if fitting and len(input_shape) in (1, 3) else ""
        raise OptionError(f"{{given}} takes {kind} inputs, but these tasks' examples have shape {tuple(input_shape)}"
                          f"{instead}", given=(f"model {name}", f"--model {name}"), model=("model", "--model"))
    if network.inputs == "image" and min(input_shape[1:]) < network.min_side:
        halvings = " halves the image four times and" if network.min_side == HALVED else ""
        side = network.min_side
        raise OptionError(f"{name}{halvings} needs at least {side}x{side} inputs, got {input_shape[1]}x{input_shape[2]} "
                          "({image_size} or more)", image_size=(f"image_size={side}", f"--image-size {side}"))
    model = network.build(tuple(input_shape), out_features)
    check_built(name, model, tuple(input_shape), out_features)
    return model


def check_built(name: str, model: nn.Module, input_shape: tuple[int, ...], out_features: int | None) -> None:
    """Refuse, in one line, a network that no method can train (a registered one of the user's):
    running statistics, which a forward pass would change (the methods apply networks as pure
    functions of their parameters), or an output of the wrong shape for two zero inputs of
    ``input_shape``: ``out_features`` per example, or one vector per example for an embedding.
    Checked when the network is built, before a run folder is written."""
    if not isinstance(model, nn.Module):
        raise MetalearnError(f"network {name}'s builder returned a {type(model).__name__}, not a torch.nn.Module")
    running = next((f"{type(m).__name__}" + (f" at {path}" if path else "") for path, m in model.named_modules()
                    if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats), None)
    if running is not None:
        raise MetalearnError(f"network {name} keeps running statistics (its {running}): the methods apply a network "
                             "as a pure function of its parameters; use metalearn.models.BatchStatNorm")
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except RuntimeError as err:  # a layer that does not fit the inputs: torch's first line says which
        raise MetalearnError(f"network {name} fails on inputs of shape {input_shape}: "
                             f"{str(err).strip().splitlines()[0]}") from None
    per_example = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
    if per_example is None:
        raise MetalearnError(f"network {name} returned a {type(out).__name__}; it must return one tensor")
    if out_features is None and len(per_example) != 1:
        raise MetalearnError(f"network {name} must embed each example as one vector; its output per example has "
                             f"shape {per_example}")
    if out_features is not None and per_example != (out_features,):
        raise MetalearnError(f"network {name} must give {out_features} outputs per example here; it gives "
                             f"{per_example}")


def output_size(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The size of the last axis of ``model``'s output for inputs of ``input_shape`` (without the
    batch axis): an embedding network's dimension, the width a method's own layers after it
    need. From one forward pass of two zero inputs without gradients; call it in ``build``,
    before the method holds the network."""
    with torch.no_grad():
        return model(torch.zeros(2, *input_shape)).shape[-1]


__all__ = ["BatchStatNorm", "batch_stat_norms", "output_size", "Conv4", "MLP", "NETWORKS", "Network", "ResNet12",
           "build_model", "check_network_name", "first_order_batch_norm", "mamlpp_conv4", "network_help",
           "network_names", "reference_conv4", "register_network"]
