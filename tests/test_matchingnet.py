"""Matching Networks: cosine attention and label probabilities against hand-computed values,
full context embeddings against an independent per-task, per-query reference (LSTM equations
written out from the weights), per-task batch statistics, learning on Omniglot, and the CLI
end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms import METHODS
from metalearn.algorithms.matchingnet import MatchingNet
from metalearn.errors import MetalearnError
from metalearn.models import Conv4
from metalearn.tasks.batch import Problem, TaskBatch

from batches import image_batch
from cli_runner import run
from learning import held_out_accuracy_before_and_after


pytestmark = pytest.mark.usefixtures("one_thread")


def fce_config(steps: int = 3) -> MatchingNet.Config:
    return MatchingNet.Config(full_context_embeddings=True, processing_steps=steps)


def test_attention_and_label_probabilities_by_hand():
    # identity embedding; support (1,0) class 0, (0,1) class 1, (1,1) class 0; query (2,0):
    # cosines 1, 0, 1/sqrt(2)
    batch = TaskBatch(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]), torch.tensor([[0, 1, 0]]),
                      torch.tensor([[[2.0, 0.0], [0.0, 3.0]]]), torch.tensor([[0, 0]]), ways=2)
    net = MatchingNet(nn.Identity())
    e = [math.exp(1), math.exp(0), math.exp(1 / math.sqrt(2))]
    first = [v / sum(e) for v in e]
    e = [math.exp(0), math.exp(1), math.exp(1 / math.sqrt(2))]  # query (0,3)
    second = [v / sum(e) for v in e]
    attention = net.attention(batch)
    torch.testing.assert_close(attention, torch.tensor([[first, second]]))

    probabilities = [[first[0] + first[2], first[1]], [second[0] + second[2], second[1]]]
    log_probs = net.predict(batch)
    torch.testing.assert_close(log_probs.exp(), torch.tensor([probabilities]))
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(1, 2))
    loss, metrics = net.meta_loss(batch)
    by_hand = -(math.log(probabilities[0][0]) + math.log(probabilities[1][0])) / 2
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    # the second query's nearest support example is of class 1, but the attention summed over
    # class 0's two examples is larger: 0.527 vs 0.473
    assert int(attention[0, 1].argmax()) == 1 and probabilities[1][0] > probabilities[1][1]
    assert float(metrics["accuracy"]) == 1.0


@pytest.mark.parametrize("distance, scale, scores", [
    # the same episode as above; query (2,0): cosines 1, 0, 1/sqrt(2); squared distances 1, 5, 2
    ("cosine", 3.0, [3.0, 0.0, 3 / math.sqrt(2)]),
    ("euclidean", 1.0, [-1.0, -5.0, -2.0]),
    ("euclidean", 0.5, [-0.5, -2.5, -1.0]),
])
def test_attention_with_a_distance_and_a_scale_by_hand(distance, scale, scores):
    batch = TaskBatch(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]), torch.tensor([[0, 1, 0]]),
                      torch.tensor([[[2.0, 0.0]]]), torch.tensor([[0]]), ways=2)
    net = MatchingNet(nn.Identity(), MatchingNet.Config(distance=distance, scale=scale))
    e = [math.exp(v) for v in scores]
    attention = [v / sum(e) for v in e]
    torch.testing.assert_close(net.attention(batch), torch.tensor([[attention]]))
    probabilities = [attention[0] + attention[2], attention[1]]
    torch.testing.assert_close(net.predict(batch).exp(), torch.tensor([[probabilities]]))


@pytest.mark.parametrize("fce", [False, True])
def test_predictions_are_distributions_over_the_ways(fce):
    net = MatchingNet(Conv4(1, None, hidden=8, pooling="max"), MatchingNet.Config(full_context_embeddings=fce), 8)
    net = net.double()
    batch = image_batch(tasks=3, ways=4, shots=2, query=3)
    log_probs = net.predict(batch)
    assert log_probs.shape == (3, 12, 4) and not log_probs.requires_grad
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 12, dtype=torch.float64))
    assert bool((log_probs <= 0).all())


def test_a_class_without_support_examples_is_refused():
    """Its label column would be log 0 = -inf everywhere, whose logsumexp has a NaN gradient
    that spreads into every parameter even when no query is of that class (a finite loss)."""
    batch = image_batch(tasks=2, ways=3, shots=2, query=1)
    support_y = batch.support_y.clone()
    support_y[1, 4:] = 0  # task 1 loses both class-2 examples; its class-2 query goes too
    query_y = batch.query_y.clone()
    query_y[1, 2] = 0
    missing = TaskBatch(batch.support_x, support_y, batch.query_x, query_y, ways=3)
    net = MatchingNet(Conv4(1, None, hidden=8, pooling="max"), MatchingNet.Config(), 8).double()
    message = "a task has a class without support examples; every class needs at least one shot"
    with pytest.raises(MetalearnError, match=message):
        net.meta_loss(missing)
    with pytest.raises(MetalearnError, match=message):
        net.predict(missing)


# -- full context embeddings against an independent reference --------------------------------


def lstm_step(x: Tensor, h: Tensor, c: Tensor, w_ih, w_hh, b_ih, b_hh) -> tuple[Tensor, Tensor]:
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def reference_log_probs(net: MatchingNet, embedding: nn.Module, batch: TaskBatch) -> Tensor:
    """Vinyals et al. appendix A, one task and one query at a time."""
    lstm, cell = net.support_context.lstm, net.query_context.cell
    out = []
    for t in range(batch.num_tasks):
        support, queries = embedding(batch.support_x[t]), embedding(batch.query_x[t])
        n, d = support.shape
        zero = support.new_zeros(d)
        h, c, forward = zero, zero, []
        for i in range(n):
            h, c = lstm_step(support[i], h, c, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
            forward.append(h)
        h, c, backward = zero, zero, [None] * n
        for i in reversed(range(n)):
            h, c = lstm_step(support[i], h, c, lstm.weight_ih_l0_reverse, lstm.weight_hh_l0_reverse,
                             lstm.bias_ih_l0_reverse, lstm.bias_hh_l0_reverse)
            backward[i] = h
        g = torch.stack(forward) + torch.stack(backward) + support  # eq. (5), the skip connection

        rows = []
        for q in queries:
            h, c = q, zero  # h_0 = f'(x), c_0 = 0
            for _ in range(net.config.processing_steps):
                r = torch.softmax(g @ h, dim=0) @ g  # read-out r_{k-1}, eq. (8)-(9)
                h_hat, c = lstm_step(torch.cat([q, r]), h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
                h = h_hat + q  # eq. (7)
            cosines = torch.stack([F.cosine_similarity(h, g_i, dim=0, eps=1e-12) for g_i in g])
            attention = torch.softmax(cosines, dim=0)
            probs = torch.stack([attention[batch.support_y[t] == k].sum() for k in range(batch.ways)])
            rows.append(probs.log())
        out.append(torch.stack(rows))
    return torch.stack(out)


def test_full_context_embeddings_match_reference_with_gradients():
    torch.manual_seed(0)
    embedding = nn.Sequential(nn.Flatten(), nn.Linear(16, 6)).double()  # 4x4 "images" -> 6-d
    net = MatchingNet(embedding, fce_config(steps=3), embedding_dim=6).double()
    batch = image_batch(tasks=2, ways=3, shots=2, query=2, size=4)
    log_probs = net.log_probs(batch)
    expected = reference_log_probs(net, embedding, batch)
    torch.testing.assert_close(log_probs, expected, rtol=1e-10, atol=1e-12)

    loss, _ = net.meta_loss(batch)
    expected_loss = F.nll_loss(expected.flatten(0, 1), batch.query_y.flatten())
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, params)
    expected_grads = torch.autograd.grad(expected_loss, params)
    names = [name for name, _ in net.named_parameters()]
    assert any(n.startswith("support_context.") for n in names) and any(n.startswith("query_context.") for n in names)
    for name, g, e in zip(names, grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-12, msg=name)
        assert g.abs().sum() > 0, name  # every parameter, the LSTMs' included, is trained


def test_full_context_embeddings_shapes_and_effect():
    torch.manual_seed(0)
    cnn = Conv4(1, None, hidden=8, pooling="max").double()
    plain = MatchingNet(cnn)
    fce = MatchingNet(cnn, fce_config(), embedding_dim=8).double()
    batch = image_batch(tasks=2, ways=3, shots=2, query=3)
    query, support = fce.embed(batch)
    assert query.shape == (2, 9, 8) and support.shape == (2, 6, 8)
    plain_query, plain_support = plain.embed(batch)
    assert not torch.allclose(query, plain_query) and not torch.allclose(support, plain_support)
    assert not torch.allclose(fce.predict(batch), plain.predict(batch))
    # the support embedding depends on the whole support set (the LSTM reads it in order)
    swapped = TaskBatch(batch.support_x.flip(1), batch.support_y.flip(1), batch.query_x, batch.query_y, 3)
    torch.testing.assert_close(plain.embed(swapped)[1], plain_support.flip(1))
    assert not torch.allclose(fce.embed(swapped)[1], support.flip(1))
    # K processing steps: more steps, another query embedding
    other = MatchingNet(cnn, fce_config(steps=1), embedding_dim=8).double()
    other.load_state_dict(fce.state_dict())
    assert not torch.allclose(other.embed(batch)[0], query)


@pytest.mark.parametrize("fce", [False, True])
def test_batch_statistics_are_per_task(fce):
    net = MatchingNet(Conv4(1, None, hidden=8, pooling="max"), MatchingNet.Config(full_context_embeddings=fce), 8)
    net = net.double()
    batch = image_batch(tasks=4)
    together = net.predict(batch)
    for t in range(4):
        torch.testing.assert_close(together[t], net.predict(batch.select(slice(t, t + 1)))[0],
                                   rtol=1e-10, atol=1e-12)


def test_options_are_checked():
    with pytest.raises(MetalearnError, match="classification"):
        MatchingNet.build(MatchingNet.Config(), Problem((1,), 1, False))
    # the LSTM is unrolled K steps, each kept for the backward pass: bounded, not a memory exhaustion
    for steps in (0, 101, 1_000_000):
        with pytest.raises(MetalearnError, match=rf"^MatchingNet.Config.processing_steps must be a whole number from 1 "
                                                 rf"to 100, got {steps!r}$"):
            MatchingNet.Config(processing_steps=steps)
    assert MatchingNet.Config(processing_steps=100).processing_steps == 100
    with pytest.raises(MetalearnError, match="MatchingNet.Config.distance"):
        MatchingNet.Config(distance="manhattan")
    with pytest.raises(MetalearnError, match="MatchingNet.Config.scale"):
        MatchingNet.Config(scale=0.0)
    with pytest.raises(MetalearnError, match="buffers"):
        MatchingNet(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4)))
    # the context LSTMs are sized by the embedding: built by hand, it must be given
    with pytest.raises(MetalearnError, match=r"full context embeddings need the embedding size \(embedding_dim\)"):
        MatchingNet(Conv4(1, None, hidden=8, pooling="max"), fce_config())
    built = MatchingNet.build(fce_config(), Problem((1, 28, 28), 5, True))
    assert built.support_context.lstm.hidden_size == 64  # the paper's 64-d embedding


def test_an_embedding_dim_other_than_the_network_output_size_is_refused_in_one_line():
    """With full context embeddings the LSTMs are built for ``embedding_dim`` features. The
    network's output size depends on the image size, which the constructor does not see, so a
    wrong value is refused at the first batch, in one line that names the right one (not as an
    LSTM shape error from inside torch); a value that is no size at all, at construction."""
    batch = image_batch(tasks=2, ways=3, shots=1, query=1, size=16)  # 8 features: 8 channels of 1 x 1
    net = MatchingNet(Conv4(1, None, hidden=8, pooling="max"), fce_config(), embedding_dim=6).double()
    for call in (net.meta_loss, net.predict, net.attention):
        with pytest.raises(MetalearnError, match=r"^matchingnet: the embedding network's output has 8 features but "
                                                 r"embedding_dim is 6; give embedding_dim=8 \(metalearn.models.output_size"
                                                 r"\(model, input_shape\)\)$"):
            call(batch)
    for wrong in (0, -64, 6.5, True):
        with pytest.raises(MetalearnError, match=rf"^embedding_dim must be a whole number of at least 1 .*, "
                                                 rf"got {wrong}$"):
            MatchingNet(Conv4(1, None, hidden=8, pooling="max"), fce_config(), embedding_dim=wrong)
    right = MatchingNet(Conv4(1, None, hidden=8, pooling="max"), fce_config(), embedding_dim=8).double()
    loss, _ = right.meta_loss(batch)
    assert torch.isfinite(loss)
    # without full context embeddings nothing is sized by it: the value is not used
    MatchingNet(Conv4(1, None, hidden=8, pooling="max"), MatchingNet.Config(), embedding_dim=6).double().meta_loss(batch)


def test_learns_omniglot_5_way_1_shot(omniglot):
    """400 episodes (100 steps of 4) with a 16-filter Conv4, paper attention (cosines of ReLU
    features lie in [0, 1], so the softmax is flat and learning slower than ProtoNets'):
    about 38% untrained, 63% after; chance is 20%."""
    torch.manual_seed(0)
    net = MatchingNet(Conv4(1, None, hidden=16, pooling="max"))
    before, after = held_out_accuracy_before_and_after(net, omniglot, steps=100)
    assert after > 0.5 and after > before + 0.15, (before, after)




def test_cli_train_and_eval_with_full_context_embeddings(tmp_path, capsys, omniglot_data_dir):
    assert METHODS["matchingnet"] is MatchingNet
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "matchingnet", "--dataset", "omniglot", "--split", "vinyals",
                          "--ways", 5, "--shots", 1, "--query", 1, "--test-query", 2, "--steps", 2,
                          "--meta-batch-size", 2, "--full-context-embeddings", "--processing-steps", 2,
                          "--eval-episodes", 6, "--val-every", 0, "--data-dir", omniglot_data_dir,
                          "--run-dir", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert "accuracy" in out and "6 episodes" in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method_config"] == {"full_context_embeddings": True, "processing_steps": 2,
                                          "model": "conv4-embedding", "distance": "cosine", "scale": 10.0}
    assert config["train"]["eval_episodes"] == 6 and config["train"]["meta_lr"] == 1e-3
    code, out, err = run(["eval", run_dir, "--episodes", 4, "--set", "processing_steps=4",
                          "--data-dir", omniglot_data_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((run_dir / "eval-episodes=4-processing_steps=4.json").read_text())["episodes"] == 4
    code, _, err = run(["train", "matchingnet", "--dataset", "sinusoid", "--run-dir", tmp_path / "r"], capsys)
    assert code == 2 and "classification method" in err
