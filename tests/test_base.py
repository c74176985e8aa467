"""What a method of one's own reaches from ``metalearn.algorithms`` (base.py): the batch and
network checks refuse as the built-in methods' do, name the method that calls them and check the
network its ``network_attribute`` names; ``embed_episodes`` embeds each task alone; a subclass of
MAML is named as itself in MAML's messages."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn.algorithms import (MAML, METHODS, MAMLConfig, MetaLearner, ProtoNet, accuracy, check_embedding_fits,
                                  check_network_fits, embed_episodes, num_ways, require_functional_model, task_loss)
from metalearn.errors import ConfigError, MetalearnError
from metalearn.models import Conv4, first_order_batch_norm
from metalearn.options import option, options
from metalearn.tasks.batch import TaskBatch

from batches import image_batch

pytestmark = pytest.mark.usefixtures("one_thread")


@options
class PrototypesConfig:
    scale: float = option(1.0, "multiplies the logits")


class Prototypes(MetaLearner):
    """ProtoNets written as a plugin would write it: public helpers only."""

    name = "toy-prototypes"
    Config = PrototypesConfig
    classification_only = True

    def __init__(self, model: nn.Module, config: PrototypesConfig = PrototypesConfig()):
        super().__init__()
        require_functional_model(model, self.name, False)
        self.model = model
        self.config = config

    @classmethod
    def build(cls, config, problem):
        return cls(Conv4(problem.input_shape[0], None, hidden=8, pooling="max"), config)

    def logits(self, batch: TaskBatch, training: bool = False) -> torch.Tensor:
        check_embedding_fits(self, batch, training=training)
        with first_order_batch_norm():
            support, query = embed_episodes(self.model, batch)
        onehot = F.one_hot(batch.support_y, num_ways(batch)).to(support.dtype)
        prototypes = onehot.transpose(1, 2) @ support / onehot.sum(1)[..., None]
        return -(query.unsqueeze(2) - prototypes.unsqueeze(1)).square().sum(-1) * self.config.scale

    def predict(self, batch):
        return self.logits(batch)

    def meta_loss(self, batch):
        logits = self.logits(batch, training=True)
        loss = task_loss(logits, batch.query_y)
        return loss, {"accuracy": accuracy(logits, batch.query_y)}


def pair():
    """ProtoNet and the plugin on one network (the same weights)."""
    torch.manual_seed(0)
    network = Conv4(1, None, hidden=8, pooling="max").double()
    return ProtoNet(network), Prototypes(network)


def refusal(learner, batch, training=False) -> str:
    with pytest.raises(MetalearnError) as refused:
        learner.meta_loss(batch) if training else learner.predict(batch)
    return str(refused.value)


def test_a_plugin_of_public_helpers_predicts_and_refuses_as_protonet_does():
    protonet, plugin = pair()
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=16)
    torch.testing.assert_close(plugin.predict(batch), protonet.predict(batch))
    without_ways = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y)  # ways from the labels
    torch.testing.assert_close(plugin.predict(without_ways), protonet.predict(batch))

    as_bytes = TaskBatch((batch.support_x * 255).to(torch.uint8), batch.support_y,
                         (batch.query_x * 255).to(torch.uint8), batch.query_y, 3)
    outside = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y + 2, 3)
    unknown = TaskBatch(batch.support_x, batch.support_y, batch.query_x, torch.full_like(batch.query_y, -1), 3)
    float_labels = TaskBatch(batch.support_x, batch.support_y.double(), batch.query_x, batch.query_y.double())
    wrong_dtype = batch.to(torch.float32)
    for bad, training in ((as_bytes, False), (outside, False), (unknown, True), (float_labels, False),
                          (wrong_dtype, False), (torch.zeros(3), False)):
        theirs, ours = refusal(protonet, bad, training), refusal(plugin, bad, training)
        assert "\n" not in ours and ours.startswith("toy-prototypes")
        assert ours == theirs.replace("protonet", "toy-prototypes")
    assert "uint8; inputs must be floating point (images as 0..255: give x.float() / 255" in refusal(plugin, as_bytes)
    outside_said = refusal(plugin, outside)
    assert "query_y has class ids [3, 4] outside 0..2 (or -1: unknown), the tasks being 3-way" in outside_said
    assert plugin.predict(unknown).shape == (2, 6, 3)  # -1 (unknown) is refused only where the loss reads it


def test_the_checks_take_the_network_the_method_names_or_is_given():
    batch = image_batch(tasks=1, ways=3, shots=1, query=1, size=16)

    class Encoder(Prototypes):
        network_attribute = "encoder"

        def __init__(self, model):
            MetaLearner.__init__(self)
            self.encoder = model

    learner = Encoder(Conv4(1, None, hidden=8, pooling="max").double())
    check_embedding_fits(learner, batch)  # found under network_attribute
    with pytest.raises(MetalearnError, match=r"^toy-prototypes: the embedding network's output per example has "
                                             r"shape \(3, 16, 16\); it must be one vector"):
        check_embedding_fits(learner, batch, network=nn.Conv2d(1, 3, 3, padding=1).double())  # the one given
    bare = Encoder.__new__(Encoder)
    MetaLearner.__init__(bare)
    with pytest.raises(MetalearnError, match=r"^toy-prototypes: the learner has no network in self\.encoder"):
        check_embedding_fits(bare, batch)

    classifier = Conv4(1, 2, hidden=8).double()  # 2 outputs for 3-way tasks
    with pytest.raises(MetalearnError, match=r"^toy-prototypes: the network has outputs of shape \(2,\) \(per "
                                             r"example\) but the tasks are 3-way"):
        check_network_fits(learner, batch, network=classifier)
    check_network_fits(learner, batch, network=Conv4(1, 3, hidden=8).double())


def test_embed_episodes_embeds_each_task_alone():
    """Batch norm sees one task at a time: a task's embeddings are the network's on that task
    alone, whatever the other tasks of the batch hold."""
    torch.manual_seed(0)
    model = Conv4(1, None, hidden=8, pooling="max").double()
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=16)
    support, query = embed_episodes(model, batch)
    assert support.shape == (2, 6, 8) and query.shape == (2, 6, 8)
    for t in range(2):
        alone = model(torch.cat([batch.support_x[t], batch.query_x[t]]))
        torch.testing.assert_close(torch.cat([support[t], query[t]]), alone)
    other = TaskBatch(torch.cat([batch.support_x[:1], 5 * batch.support_x[1:]]), batch.support_y,
                      torch.cat([batch.query_x[:1], batch.query_x[1:] - 3]), batch.query_y, 3)
    torch.testing.assert_close(embed_episodes(model, other)[0][0], support[0])


def test_num_ways_is_the_batchs_or_the_support_labels():
    batch = image_batch(tasks=1, ways=3, shots=1, query=1)
    assert num_ways(batch) == 3
    labels = torch.tensor([[0, 3, 1, 2]])
    assert num_ways(TaskBatch(torch.zeros(1, 4, 2), labels, torch.zeros(1, 1, 2), labels[:, :1])) == 4


@options
class ANILConfig(MAMLConfig):
    """MAML's options, under the subclass's name."""


class ANIL(MAML):
    name = "toy-anil"
    Config = ANILConfig


class Reused(MAML):
    name = "toy-reused"
    Config = MAMLConfig  # the parent's own class: its messages keep the parent's name


def test_a_subclass_of_maml_is_named_as_itself():
    with pytest.raises(ConfigError, match=r"^ANIL\.Config\.inner_steps must be at least 1"):
        ANILConfig(inner_steps=0)
    with pytest.raises(ConfigError, match=r"^ANIL\.Config\.first_order_steps must be >= 0"):
        ANILConfig(first_order_steps=-1)
    with pytest.raises(MetalearnError, match=r"^ANIL needs a model without running-statistics buffers"):
        ANIL(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)), ANILConfig())
    with pytest.raises(MetalearnError, match=r"^ANIL\.Config\.per_step_bn_weights needs a network with batch norm"):
        ANIL(nn.Linear(1, 1), ANILConfig(per_step_bn_weights=True))
    # MAML's own keep its name, also after a subclass set its Config to MAML's class
    assert MAMLConfig.owner_name == "MAML.Config" and Reused.Config is MAMLConfig
    with pytest.raises(ConfigError, match=r"^MAML\.Config\.inner_steps must be at least 1"):
        MAMLConfig(inner_steps=0)
    with pytest.raises(MetalearnError, match=re.escape("MAML needs a model without running-statistics buffers")):
        MAML(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)))


# every built-in method of image tasks, and each of their presets ("maml++"), at collection time:
# a method a test registers later is not among them
PREDICTING = [name for name, cls in METHODS.items()
              if cls.__module__.startswith("metalearn.") and not cls.reinforcement]
PREDICTING += [preset for name in list(PREDICTING) for preset in METHODS[name].presets]


def test_the_predict_contract_covers_every_method():
    assert {"maml", "maml++", "platipus", "protonet", "matchingnet", "reptile", "memory",
            "statistician"} <= set(PREDICTING)


@pytest.mark.parametrize("name", PREDICTING)
def test_predict_leaves_the_learner_as_it_found_it(name):
    """MetaLearner.predict's contract: evaluation calls it episode after episode and
    ``metalearn predict`` on parts of the support set first, to measure a pass's memory, so
    no call may change the learner's weights or buffers (running statistics, a memory; a
    sampling method, PLATIPUS, draws from torch's generator, as dropout does). Each built-in
    method, with the paper's defaults (MAML++: its preset, per-step batch-norm statistics),
    after a few training steps so that its buffers are not their initial values."""
    from metalearn.algorithms import build_learner
    from metalearn.api import resolve_config
    from metalearn.tasks import Problem

    method, preset = next(((m, name) for m in METHODS if name in METHODS[m].presets), (name, None))
    config = resolve_config(method, task={"dataset": "omniglot", "ways": 3, "shots": 2, "query": 2}, preset=preset)
    learner = build_learner(method, config.method_config, Problem((1, 28, 28), 3, True)).float()
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=28, dtype=torch.float32)
    optimizer = torch.optim.SGD(learner.parameters(), lr=1e-3)
    learner.train()
    for _ in range(2):
        loss, _ = learner.meta_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learner.eval()
    before = {key: value.clone() for key, value in learner.state_dict().items()}
    learner.predict(batch)
    learner.predict(image_batch(tasks=1, ways=3, shots=1, query=2, size=28, seed=1, dtype=torch.float32))
    after = learner.state_dict()
    assert after.keys() == before.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert not changed, changed
