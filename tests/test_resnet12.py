"""ResNet-12 (metalearn.models.ResNet12) and the network registry (metalearn.models.NETWORKS):
shapes, size, MAML's meta-gradient through it against a per-task reference, ProtoNets learning
with it, every method that takes a network running it, and the methods' ``model`` options
derived from the registry; conv4-flat (ProtoNets' flattened embedding) and ProtoNets' default
network for each dataset."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batches import image_batch
from cli_runner import run
from learning import held_out_accuracy_before_and_after
from metalearn.algorithms import METHODS, MAML, ProtoNet, build_learner
from metalearn.algorithms.protonet import embed_episodes
from metalearn.errors import ConfigError, MetalearnError
from metalearn.models import NETWORKS, ResNet12, build_model, network_names
from metalearn.options import help_of
from metalearn.tasks.batch import Problem
from reference import ref_adapt, ref_task_loss

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = (3, 4, 5, 6)  # filters per block: a ResNet-12 that takes milliseconds


def buffers(model) -> list[str]:
    return [name for name, _ in model.named_buffers()]


# -- the network ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 84, 84)], ids=["28x28-grey", "84x84-rgb"])
def test_classifier_and_embedding_outputs_have_the_right_shapes_and_no_buffers(shape):
    x = torch.rand(4, *shape)
    classifier, embedding = ResNet12(shape[0], 5, SMALL), ResNet12(shape[0], None, SMALL)
    assert classifier(x).shape == (4, 5)
    assert embedding(x).shape == (4, SMALL[-1]) and embedding.embedding_dim == SMALL[-1]
    assert buffers(classifier) == [] and buffers(embedding) == []
    # through the registry, at the default widths: the 640-d embedding, a head of one output per class
    assert build_model("resnet12", shape, None)(x[:2]).shape == (2, 640)
    assert build_model("resnet12", shape, 5)(x[:2]).shape == (2, 5)


def test_the_default_embedding_has_the_reference_architectures_12_4_million_parameters():
    """Counted from the layer sizes of MetaOptNet's ResNet-12 (learn2learn's
    ``ResNet12`` has the same layers): per block of c_in -> c filters, three 3x3 convolutions
    without bias (9 c_in c + 2 * 9 c^2), a 1x1 shortcut convolution (c_in c) and four batch
    norms with a scale and an offset (4 * 2c). The literature gives 12.4 M for 3-channel
    inputs and widths 64-160-320-640."""
    expected, c_in = 0, 3
    for c in (64, 160, 320, 640):
        expected += 9 * c_in * c + 2 * 9 * c * c + c_in * c + 4 * 2 * c
        c_in = c
    assert expected == 12_424_320 and round(expected / 1e6, 1) == 12.4
    model = ResNet12(3, None)
    assert sum(p.numel() for p in model.parameters()) == expected
    # a head adds 640 * ways + ways
    assert sum(p.numel() for p in ResNet12(3, 5).parameters()) == expected + 640 * 5 + 5


def test_convolutions_are_kaiming_normal_fan_out_and_small_inputs_are_refused():
    torch.manual_seed(0)
    conv = ResNet12(3, None).blocks[3].conv2.weight  # 640 x 640 x 3 x 3: std sqrt(2 / (640 * 9))
    assert abs(conv.std().item() / (2 / (640 * 9)) ** 0.5 - 1) < 0.01 and abs(conv.mean().item()) < 1e-4
    with pytest.raises(MetalearnError, match="^resnet12 halves the image four times and needs at least 16x16 "
                                             r"inputs, got 12x12 \(image_size=16 or more\)$"):
        build_model("resnet12", (1, 12, 12), 5)
    with pytest.raises(MetalearnError, match=r"^model resnet12 takes image \(C, H, W\) inputs, but these tasks' "
                                             r"examples have shape \(1,\); give model mlp$"):
        build_model("resnet12", (1,), 5)


# -- under MAML: the generic vmap path, against a per-task reference ------------------------------


def resnet12_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ResNet12 as a function of its parameters, written with F.conv2d / F.batch_norm on the
    explicit weights (batch statistics), sharing no code with the package."""
    def norm(h, name):
        return F.batch_norm(h, None, None, params[f"{name}.weight"], params[f"{name}.bias"], training=True, eps=1e-5)

    for b in range(4):
        p = f"blocks.{b}."
        h = F.leaky_relu(norm(F.conv2d(x, params[p + "conv1.weight"], padding=1), p + "norm1"), 0.1)
        h = F.leaky_relu(norm(F.conv2d(h, params[p + "conv2.weight"], padding=1), p + "norm2"), 0.1)
        h = norm(F.conv2d(h, params[p + "conv3.weight"], padding=1), p + "norm3")
        shortcut = norm(F.conv2d(x, params[p + "shortcut_conv.weight"]), p + "shortcut_norm")
        x = F.max_pool2d(F.leaky_relu(h + shortcut, 0.1), 2)
    return F.linear(x.mean(dim=(-2, -1)), params["head.weight"], params["head.bias"])


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_maml_meta_gradient_through_resnet12_equals_a_per_task_autograd_loop(first_order):
    torch.manual_seed(0)
    model = ResNet12(1, 3, SMALL).double()
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=16)
    params = dict(model.named_parameters())
    torch.testing.assert_close(resnet12_forward(params, batch.query_x[0]), model(batch.query_x[0]),
                               rtol=1e-12, atol=1e-12)

    maml = MAML(model, MAML.Config(inner_lr=0.1, inner_steps=2, first_order=first_order))
    assert not maml._tasks_batched_by_model()  # no forward_tasks: every task under vmap
    loss, _ = maml.meta_loss(batch)
    grads = torch.autograd.grad(loss, list(params.values()))

    losses = []
    for t in range(batch.num_tasks):
        adapted = ref_adapt(resnet12_forward, params, batch.support_x[t], batch.support_y[t], 2,
                            lambda name, step: 0.1, first_order)[-1]
        losses.append(ref_task_loss(resnet12_forward(adapted, batch.query_x[t]), batch.query_y[t]))
    expected_loss = torch.stack(losses).mean()
    expected = torch.autograd.grad(expected_loss, list(params.values()))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-12)
    for name, actual, wanted in zip(params, grads, expected):
        assert wanted.abs().max() > 0, name
        torch.testing.assert_close(actual, wanted, rtol=1e-7, atol=1e-10, msg=name)


# -- every method that takes a network --------------------------------------------------------

# methods whose options name a network, the options that keep them small here, and the role the
# network plays: an output layer to adapt, or an embedding to compare
MODEL_METHODS = [name for name, cls in METHODS.items() if "model" in {f.name for f in dataclasses.fields(cls.Config)}]
SMALL_OPTIONS = {"memory": {"memory_size": 64, "choose_k": 8, "key_dim": 8, "dropout": 0.0},
                 "platipus": {"num_samples": 2}}
VARIANTS = [(name, SMALL_OPTIONS.get(name, {})) for name in MODEL_METHODS] + [
    ("maml", {"per_step_bn_weights": True, "per_step_bn_statistics": True}),
    ("maml", {"learn_inner_lr": True, "first_order": True}),
    ("matchingnet", {"full_context_embeddings": True}),
]


@pytest.fixture
def small_resnet12(monkeypatch):
    """The registry's resnet12 entry, building the small widths."""
    entry = NETWORKS["resnet12"]
    monkeypatch.setitem(NETWORKS, "resnet12", dataclasses.replace(
        entry, build=lambda shape, out: ResNet12(shape[0], out, SMALL)))


def test_the_methods_that_take_a_network_are_those_expected():
    assert set(MODEL_METHODS) >= {"maml", "platipus", "reptile", "protonet", "matchingnet", "memory"}
    assert not {"statistician", "maml-rl"} & set(MODEL_METHODS)  # their networks are the papers' own


@pytest.mark.parametrize("method,options", VARIANTS, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "defaults")
def test_every_method_that_takes_a_network_trains_and_predicts_with_resnet12(small_resnet12, method, options):
    torch.manual_seed(0)
    learner = build_learner(method, {**options, "model": "resnet12"}, Problem((1, 16, 16), 3, True)).double()
    assert any(isinstance(m, ResNet12) for m in learner.modules())
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=16)
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    resnet = next(m for m in learner.modules() if isinstance(m, ResNet12))
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in resnet.parameters())
    assert resnet.blocks[0].conv1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        prediction = learner.predict(batch)
    assert prediction.shape[:2] == (2, 6) and torch.isfinite(prediction).all()


# -- ProtoNets learns with it -----------------------------------------------------------------


def test_protonet_with_a_resnet12_embedding_learns_omniglot_5_way_1_shot(omniglot):
    """160 episodes (40 Adam steps of 4 at 0.01) with a ResNet-12 of 8-8-16-16 filters: far above
    the 20% of chance (measured: 32% untrained, 63% after)."""
    torch.manual_seed(0)
    protonet = ProtoNet(ResNet12(1, None, (8, 8, 16, 16)))
    before, after = held_out_accuracy_before_and_after(protonet, omniglot, steps=40, lr=1e-2)
    assert after > 0.5 and after > before + 0.2, (before, after)


# -- the registry -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_registered_network_builds_as_what_it_serves(name):
    network = NETWORKS[name]
    shape = (3, 32, 32) if network.inputs == "image" else (4,)
    x = torch.rand(2, *shape)
    if network.classifier:
        model = build_model(name, shape, 5)
        assert model(x).shape == (2, 5) and not any("running" in b for b in buffers(model))
    else:
        with pytest.raises(MetalearnError, match=f"^{name} has no output layer; this method needs one of "):
            build_model(name, shape, 5)
    if network.embedding:
        model = build_model(name, shape, None)
        assert model(x).dim() == 2 and not any("running" in b for b in buffers(model))
    else:
        with pytest.raises(MetalearnError, match=f"^{name} is a classifier .*; use an embedding network here: "):
            build_model(name, shape, None)
    assert network.description and "\n" not in network.description


def accepted(method: str) -> set[str]:
    config = METHODS[method].Config
    names = set()
    for name in NETWORKS:
        try:
            config(model=name)
            names.add(name)
        except ConfigError:
            pass
    return names


def named_in(help_text: str) -> set[str]:
    """The registered networks the help names, outside parentheses (where notes may mention
    another network: "conv4 as the MAML authors' code builds it")."""
    bare = re.sub(r"\([^)]*\)", "", help_text)
    return {name for name in NETWORKS if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", bare)}


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_each_methods_model_help_names_exactly_the_networks_it_accepts(method):
    field = next(f for f in dataclasses.fields(METHODS[method].Config) if f.name == "model")
    assert named_in(help_of(field)) == accepted(method)
    role = "embedding" if METHODS[method].classification_only else "classifier"
    # the Memory Module's networks take images; the other methods take vectors too (mlp)
    assert accepted(method) == set(network_names(role, "image" if method == "memory" else None))
    assert "resnet12" in accepted(method)


def test_an_unknown_or_unfit_network_is_one_line_listing_the_valid_ones(capsys):
    valid = ", ".join(NETWORKS)
    plugins = re.escape(" (one of your own: name its module in METALEARN_PLUGINS)")
    with pytest.raises(MetalearnError, match=f"^unknown model 'resnet13'; valid models: {re.escape(valid)}{plugins}$"):
        build_model("resnet13", (3, 84, 84), 5)
    embeddings = network_names("embedding")  # images or vectors: the dataset's inputs are checked as it is built
    listed = f"{', '.join(embeddings[:-1])} or {embeddings[-1]}"
    with pytest.raises(ConfigError, match=f"^ProtoNet.Config.model must be an embedding network: {re.escape(listed)}; "
                                          f"got 'resnet13'{plugins}$"):
        ProtoNet.Config(model="resnet13")
    with pytest.raises(ConfigError, match="^ProtoNet.Config.model must be .*; conv4-reference is a classifier only$"):
        ProtoNet.Config(model="conv4-reference")
    with pytest.raises(ConfigError, match="^MAML.Config.model must be a network with an output layer: .*resnet12.*; "
                                          "conv4-embedding has no output layer$"):
        MAML.Config(model="conv4-embedding")
    code, _, err = run(["train", "protonet", "--model", "resnet13", "--print-config"], capsys)
    assert code == 2 and "--model must be an embedding network: conv4, " in err and "got 'resnet13'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_registered_network_that_no_method_can_train_is_refused_before_a_run_folder_is_written(tmp_path,
                                                                                                   monkeypatch):
    from torch import nn

    from metalearn import resolve_config, train
    from metalearn.models import Network, register_network

    class Maps(nn.Module):  # an embedding that forgot to pool its feature maps
        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv2d(channels, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    monkeypatch.setattr("metalearn.models.NETWORKS", dict(NETWORKS))
    refusals = {
        "maps": (lambda shape, out: Maps(shape[0]), "network maps must embed each example as one vector; its output "
                                                    "per example has shape (4, 28, 28)"),
        "seven": (lambda shape, out: nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 7)),
                  "network seven must give 5 outputs per example here; it gives (7,)"),
        "tracked": (lambda shape, out: nn.Sequential(nn.Conv2d(shape[0], 4, 3), nn.BatchNorm2d(4), nn.Flatten(1)),
                    "network tracked keeps running statistics (its BatchNorm2d at 1): the methods apply a network "
                    "as a pure function of its parameters; use metalearn.models.BatchStatNorm"),
        "narrow": (lambda shape, out: nn.Sequential(nn.Flatten(), nn.Linear(10, out or 3)),
                   "network narrow fails on inputs of shape (1, 28, 28): mat1 and mat2 shapes cannot be multiplied"),
    }
    for name, (build, refusal) in refusals.items():
        register_network(Network(name, build, True, True, "image", f"a network that {name}"))
        method = "maml" if name == "seven" else "protonet"
        config = resolve_config(method, {"dataset": "omniglot", "ways": 5}, train={"steps": 1, "val_every": 0})
        config = dataclasses.replace(config, method_config={**config.method_config, "model": name})
        with pytest.raises(MetalearnError) as refused:
            build_learner(config.method, config.method_config, Problem((1, 28, 28), 5, True))
        assert str(refused.value).startswith(refusal), str(refused.value)
    with pytest.raises(MetalearnError, match="^network maps must embed"):
        train(dataclasses.replace(config, method="protonet", method_config={"model": "maps"}),
              run_dir=tmp_path / "run", evaluate_after=False, progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# -- conv4-flat: ProtoNets' embedding as the authors' code flattens it ------------------------------


def test_conv4_flat_is_conv4_embedding_with_the_final_map_flattened():
    """64-d at 28x28, where the final map is 1x1 and the flattened map is the averaged one (the
    same weights under the same names give the same embedding); 5x5x64 = 1600-d at 84x84."""
    torch.manual_seed(0)
    flat, averaged = build_model("conv4-flat", (1, 28, 28), None), build_model("conv4-embedding", (1, 28, 28), None)
    assert list(dict(flat.named_parameters())) == list(dict(averaged.named_parameters()))
    averaged.load_state_dict(flat.state_dict())
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert flat(x).shape == (5, 64)
        torch.testing.assert_close(flat(x), averaged(x), rtol=0, atol=0)
    photo = torch.rand(2, 3, 84, 84)
    with torch.no_grad():
        assert build_model("conv4-flat", (3, 84, 84), None)(photo).shape == (2, 1600)
        assert build_model("conv4-embedding", (3, 84, 84), None)(photo).shape == (2, 64)  # unchanged: averaged
    with pytest.raises(MetalearnError, match="^conv4-flat halves the image four times and needs at least 16x16"):
        build_model("conv4-flat", (3, 12, 12), None)


def test_protonet_defaults_to_conv4_flat_on_photographs_and_conv4_embedding_on_omniglot():
    from metalearn import resolve_config

    models = {dataset: resolve_config("protonet", {"dataset": dataset}).method_config["model"]
              for dataset in ("omniglot", "mini-imagenet", "folder")}
    assert models == {"omniglot": "conv4-embedding", "mini-imagenet": "conv4-flat", "folder": "conv4-flat"}
    # a model given is kept
    given = resolve_config("protonet", {"dataset": "mini-imagenet"}, {"model": "conv4-embedding"})
    assert given.method_config["model"] == "conv4-embedding"


def test_protonet_trains_and_predicts_with_conv4_flat_on_84x84_rgb_images():
    from metalearn.tasks.batch import TaskBatch

    torch.manual_seed(0)
    protonet = build_learner("protonet", {"model": "conv4-flat"}, Problem((3, 84, 84), 3, True))
    labels = torch.arange(3)
    batch = TaskBatch(torch.rand(1, 6, 3, 84, 84), labels.repeat(2)[None], torch.rand(1, 6, 3, 84, 84),
                      labels.repeat_interleave(2)[None], 3)
    loss, metrics = protonet.meta_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= metrics["accuracy"] <= 1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in protonet.parameters())
    with torch.no_grad():
        support, _ = embed_episodes(protonet.model, batch)
        # independently: the task's 12 images through the network at once (batch-norm statistics of
        # the task), each class's prototype the mean of its two support embeddings, the logits minus
        # the squared Euclidean distance of each query's 1600-d embedding to each prototype
        embedded = protonet.model(torch.cat([batch.support_x[0], batch.query_x[0]])).flatten(1)
        prototypes = torch.stack([embedded[:6][batch.support_y[0] == c].mean(0) for c in range(3)])
        expected = -(embedded[6:, None, :] - prototypes[None]).square().sum(-1)
    assert support.shape == (1, 6, 1600)
    logits = protonet.predict(batch)
    assert logits.shape == (1, 6, 3)
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-3)


def test_the_api_docs_table_of_networks_has_every_registered_network_with_its_role():
    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9_+-]+)` \| (classifier|embedding|both) \|", text, re.MULTILINE))
    roles = {name: "both" if n.classifier and n.embedding else "classifier" if n.classifier else "embedding"
             for name, n in NETWORKS.items()}
    assert rows == roles, "docs/api.md's table of networks (name | serves as | ...) differs from NETWORKS"


def test_a_run_of_a_network_registered_in_another_process_says_so(tmp_path):
    from metalearn import resolve_config
    from metalearn.runs import RunDir

    config = resolve_config("protonet", {"dataset": "omniglot", "ways": 5})
    RunDir(tmp_path / "run").write_config(dataclasses.replace(config, method_config={"model": "tiny"}))
    with pytest.raises(MetalearnError, match=r"the run's network 'tiny' is not known to this process: one "
                                             r"registered in Python \(metalearn.models.register_network\) is known "
                                             r"to every process when its module is a plugin "
                                             r"\(METALEARN_PLUGINS=./my_module.py\)$"):
        RunDir(tmp_path / "run").read_config()
