"""What a method of one's own reaches from ``metalearn.algorithms`` (base.py): the batch and
network checks refuse as the built-in methods' do, name the method that calls them and check the
network its ``network_attribute`` names; ``embed_episodes`` embeds each task alone; a subclass of
MAML is named as itself in MAML's messages."""

from __future__ import annotations

import inspect
import re
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

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


# -- one call at a time per learner: serving from threads -------------------------------------------


class Overlaps(Prototypes):
    """The plugin, counting how many of its calls run at once, through a public helper of its own."""

    name = "toy-overlaps"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.running, self.most = 0, 0

    def own_helper(self, batch: TaskBatch) -> torch.Tensor:
        self.running += 1
        self.most = max(self.most, self.running)
        time.sleep(0.005)  # a thread switch here lets a second call in, unless it waits
        self.running -= 1
        return self.logits(batch)

    def predict(self, batch):
        return self.own_helper(batch)

    def _private(self):
        return None


def in_threads(call, threads: int = 4, calls: int = 3) -> list:
    """``call()`` ``calls`` times in each of ``threads`` threads at once: the results, or the
    first error raised."""
    results, errors = [], []

    def serve():
        try:
            for _ in range(calls):
                results.append(call())
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    started = [threading.Thread(target=serve) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_a_learners_public_methods_run_one_call_at_a_time():
    """Every public method a subclass defines (its own helpers too) holds the learner's lock:
    threads sharing the learner take turns. Private methods and the input preparation are left
    unlocked (they are called inside a locked call, or never run the network)."""
    torch.manual_seed(0)
    learner = Overlaps(Conv4(1, None, hidden=8, pooling="max").double())
    batch = image_batch(tasks=1)
    in_threads(lambda: learner.predict(batch))
    in_threads(lambda: learner.own_helper(batch))
    in_threads(lambda: learner.fit_predict(batch.support_x[0], batch.support_y[0], batch.query_x[0]))
    assert learner.most == 1
    assert Overlaps.own_helper.serialised and Overlaps.predict.serialised and MetaLearner.meta_loss.serialised
    assert not hasattr(Overlaps._private, "serialised") and not hasattr(MetaLearner.task_batch, "serialised")
    assert inspect.signature(Overlaps.own_helper) == inspect.signature(Overlaps.own_helper.__wrapped__)


@pytest.mark.parametrize("name", ["maml", "platipus", "reptile", "protonet", "matchingnet"])
def test_threads_sharing_a_learner_get_what_each_would_get_alone(name):
    """torch.func.functional_call swaps the network's parameters in place while a call runs, and
    fit_predict puts the learner in eval mode and back: concurrent calls would compute with each
    other's weights, leave plain tensors in place of the parameters, or a learner in training
    mode in eval mode. Serialised, each gets its answer and the learner stays as it was."""
    from metalearn.algorithms import build_learner
    from metalearn.tasks import Problem

    torch.manual_seed(0)
    learner = build_learner(name, {"test_inner_steps": 2} if name != "protonet" and name != "matchingnet" else {},
                            Problem((1, 16, 16), 3, True))
    support, query = torch.rand(3, 1, 16, 16), torch.rand(6, 1, 16, 16)
    alone = learner.fit_predict(support, [0, 1, 2], query)
    parameters = dict(learner.named_parameters())
    learner.train()
    results = in_threads(lambda: learner.fit_predict(support, [0, 1, 2], query))
    assert len(results) == 12 and all(torch.equal(found, alone) for found in results)
    assert dict(learner.named_parameters()) == parameters  # the same Parameter objects, none swapped for a tensor
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in learner.parameters())
    assert all(module.training for module in learner.modules())


def test_the_lock_is_in_no_state_dict_pickle_or_copy():
    """The lock is made on the first call; a copy or an unpickled learner makes its own, and the
    state_dict (what checkpoints hold) has no entry for it."""
    import copy
    import pickle

    from metalearn.algorithms.base import call_lock

    protonet, _ = pair()
    batch = image_batch(tasks=1)
    expected = protonet.predict(batch)
    assert call_lock(protonet) is call_lock(protonet)
    assert all(isinstance(value, torch.Tensor) for value in protonet.state_dict().values())
    for copied in (copy.deepcopy(protonet), pickle.loads(pickle.dumps(protonet))):
        assert "_call_lock" not in copied.__dict__
        assert torch.equal(copied.predict(batch), expected)
        assert call_lock(copied) is not call_lock(protonet)
        assert copied.state_dict().keys() == protonet.state_dict().keys()


@pytest.mark.parametrize("name", ["maml", "platipus", "reptile"])
def test_methods_that_adapt_by_gradients_predict_under_inference_mode(name):
    """MAML, PLATIPUS and Reptile take their inner steps with torch.func.grad, which runs under
    torch.inference_mode(); MAML's faster task-batched path (torch.autograd) cannot, and gives way
    to it there: the same predictions as under torch.no_grad()."""
    from metalearn.algorithms import build_learner
    from metalearn.tasks import Problem

    torch.manual_seed(0)
    learner = build_learner(name, {"test_inner_steps": 2}, Problem((1, 16, 16), 3, True))
    if name == "maml":
        assert learner._tasks_batched_by_model()  # the path that needs torch.autograd outside inference mode
    support, query = torch.rand(3, 1, 16, 16), torch.rand(6, 1, 16, 16)
    batch = learner.task_batch(support, [0, 1, 2], query)
    with torch.no_grad():
        torch.manual_seed(1)  # PLATIPUS's predict draws its models from torch's generator
        expected, probabilities = learner.predict_per_step(batch), learner.fit_predict(support, [0, 1, 2], query)
    with torch.inference_mode():
        torch.manual_seed(1)
        found = learner.predict_per_step(batch)
        torch.testing.assert_close(learner.fit_predict(support, [0, 1, 2], query), probabilities)
    torch.testing.assert_close(found, expected)
    assert (found[-1] - found[0]).abs().max() > 1e-3  # the steps moved the predictions


class AutogradStep(Prototypes):
    """The plugin, adapting as a method of one's own may: a gradient step with torch.autograd."""

    name = "toy-autograd-step"

    def predict(self, batch):
        params = {key: value.detach().requires_grad_() for key, value in self.model.named_parameters()}
        with torch.enable_grad():
            loss = functional_call(self.model, params, (batch.support_x.flatten(0, 1),)).square().mean()
            steps = torch.autograd.grad(loss, list(params.values()))
        assert all(torch.isfinite(step).all() for step in steps)
        return self.logits(batch)


def test_a_method_that_adapts_by_autograd_under_inference_mode_is_told_the_remedy():
    """torch.autograd cannot differentiate under torch.inference_mode() (torch.enable_grad() does
    not lift it): one line naming the remedy, from predict and fit_predict alike, and the learner
    still answers afterwards."""
    torch.manual_seed(0)
    learner = AutogradStep(Conv4(1, None, hidden=8, pooling="max").double())
    batch = image_batch(tasks=1)
    with torch.no_grad():
        expected = learner.predict(batch)
    said = ("toy-autograd-step adapts to the support set by gradient steps, which torch.inference_mode() forbids "
            "(torch.enable_grad() cannot lift it): call it under torch.no_grad() instead, or under neither")
    with torch.inference_mode():
        with pytest.raises(MetalearnError) as refused:
            learner.predict(batch)
        assert str(refused.value) == said and refused.value.__cause__ is None
        with pytest.raises(MetalearnError, match=re.escape(said)):
            learner.fit_predict(batch.support_x[0], batch.support_y[0], batch.query_x[0])
    assert torch.equal(learner.predict(batch), expected)


def test_a_regression_learner_is_told_how_to_predict_without_fit_predict():
    """fit_predict and task_batch classify: a learner built for regression (load_trained of a
    sinusoid run) is told, in one line, to build a TaskBatch of float targets and call predict,
    not that its float support targets are no class ids."""
    from metalearn.algorithms import build_learner, make_method_config
    from metalearn.models import MLP
    from metalearn.tasks.batch import Problem

    learner = build_learner("maml", make_method_config("maml", {"model": "mlp"}),
                            Problem(input_shape=(1,), output_dim=1, classification=False))
    x, y = torch.linspace(-1, 1, 5)[:, None], torch.sin(torch.linspace(-1, 1, 5))[:, None]
    for call in (learner.fit_predict, learner.task_batch):
        with pytest.raises(MetalearnError, match=r"^maml: this learner was built for regression; task_batch and "
                                                 r"fit_predict classify: .* call learner.predict\(batch\)$"):
            call(x, y, x)
    batch = TaskBatch(x[None], y[None], x[None], torch.zeros_like(y)[None])
    assert learner.predict(batch).shape == (1, 5, 1)
    assert isinstance(learner.model, MLP)
