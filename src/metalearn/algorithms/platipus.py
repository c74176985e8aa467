"""Probabilistic MAML, PLATIPUS (Finn, Xu & Levine, "Probabilistic Model-Agnostic
Meta-Learning", NeurIPS 2018), batched over tasks and over sampled models.

The initial parameters of MAML become a random variable with a learned diagonal Gaussian
prior ``p(theta) = N(mu_theta, sigma_theta^2)`` (section 4). A task's model is obtained by
sampling ``theta`` and running MAML's inner loop from it; different samples give different,
individually plausible models when the support set is ambiguous.

Meta-training (Algorithm 1), per task with support set D_tr and query set D_test, with L the
task loss (the negative log-likelihood up to scale: cross-entropy, or squared error):

    lines 6-7  q(theta | D_tr, D_test) = N(mu_theta - gamma_q * grad_mu L(mu_theta, D_test), v_q)
               (the variational posterior: one gradient step on the query set from the mean)
    line 7     theta ~ q                                  (reparameterised: mean + std * eps)
    lines 8-9  phi = theta - alpha * grad_theta L(theta, D_tr)     (MAML's inner loop)
    line 10    p(theta | D_tr) = N(mu_theta - gamma_p * grad_mu L(mu_theta, D_tr), sigma_theta^2)
               (the prior conditioned on the support set)
    line 11    minimise  L(phi, D_test) + D_KL(q(theta | D_tr, D_test) || p(theta | D_tr))

the negative of the paper's variational lower bound on log p(y_test | x_test, D_tr) (section
4; the ``log p(phi | theta)`` term of the bound is dropped, as Algorithm 1 line 11 does). The
learned meta-parameters are Theta = {mu_theta, sigma_theta^2, v_q, gamma_p, gamma_q}
(Algorithm 1 line 1); the inner step size alpha stays fixed. Here L is the *mean* loss over the
query set, so the KL term carries a weight ``kl_weight``: 1 / (query examples) for
classification and ``2 noise^2 / (query points)`` for regression with Gaussian noise make the
meta-loss the negative bound divided by a constant (:func:`bound_weight`, the regression
default; Omniglot defaults to an empirical 1e-4, see ``OMNIGLOT_KL_WEIGHT``). The query loss
is the mean over ``train_samples`` samples of theta (Algorithm 1 draws one).

Meta-testing (Algorithm 2): theta ~ p(theta | D_tr) = N(mu_theta - gamma_p * grad L(mu_theta,
D_tr), sigma_theta^2), then gradient steps on D_tr from each sample. ``num_samples`` samples
per task give ``num_samples`` models; :meth:`PLATIPUS.predict` returns their average prediction
(for classification the log of the average of their softmax probabilities).

Everything is one computation: ``vmap`` over tasks of a ``vmap`` over samples, with the
standard-normal noise drawn beforehand as a ``(tasks, samples, *param_shape)`` tensor per
parameter, so a seed or ``generator`` makes the samples reproducible.

Example::

    >>> from metalearn.models import MLP
    >>> platipus = PLATIPUS(MLP(), PLATIPUS.Config(inner_lr=0.01, prior_step_init=0.01, posterior_step_init=0.01,
    ...                                            std_init=0.1, kl_weight=0.036, model="mlp"))  # sine-or-line's
    >>> loss, metrics = platipus.meta_loss(batch)          # batch: a TaskBatch of sine-or-line tasks
    >>> loss.backward()                                    # second order, through both gradient steps
    >>> samples = platipus.sample_predictions(batch, 20)   # (20, tasks, n_query, 1)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from metalearn.algorithms.base import (MetaLearner, Problem, average_prediction, check_network_fits, evaluating,
                                       prediction_generator, probabilities, require_functional_model, task_loss)
from metalearn.algorithms.inner_loop import (Params, check_inner_loop_options, gradient_descent, loss_gradient,
                                            sgd_step)
from metalearn.datasets import of_photographs
from metalearn.errors import ConfigError, check_count, require_number
from metalearn.options import option, options
from metalearn.models import build_model, check_network_name, network_help
from metalearn.models.norm import first_order_batch_norm
from metalearn.tasks.batch import TaskBatch


@options
class PLATIPUSConfig:
    """inner_lr: MAML's alpha, fixed; inner_steps / test_inner_steps: gradient steps on the
    support set from each sampled theta during meta-training / at test time; num_samples:
    models sampled per task at test time; train_samples: samples of theta ~ q per task in the
    meta-loss (Algorithm 1 uses 1); kl_weight: weight of D_KL(q || p) in the meta-loss;
    prior_step_init / posterior_step_init: initial gamma_p / gamma_q (learned); std_init:
    initial sigma_theta and sqrt(v_q) (learned, one per weight); first_order: drop second
    derivatives of every inner gradient; model: network name (see ``metalearn.models``)."""

    inner_lr: float = option(0.4, "step size of the inner-loop gradient steps (MAML's alpha, fixed)")
    inner_steps: int = option(1, "inner-loop gradient steps from each sampled set of weights during meta-training",
                              training_only=True, memory="fewer")
    test_inner_steps: int = option(3, "inner-loop gradient steps at validation and test time")
    num_samples: int = option(10, "models sampled per task at test time (their predictions are averaged)",
                              memory="fewer")
    train_samples: int = option(1, "weight samples per task in the meta-loss (the paper's Algorithm 1: 1)",
                                training_only=True)
    kl_weight: float = option(1.0, "weight of KL(q || p) in the meta-loss", training_only=True)
    prior_step_init: float = option(0.4, "initial step size gamma_p of the prior's adaptation (learned)")
    posterior_step_init: float = option(0.4, "initial step size gamma_q of the posterior's adaptation (learned)")
    std_init: float = option(0.01, "initial standard deviation of every weight's prior and posterior (learned)")
    first_order: bool = option(False, "drop the second derivatives of every inner gradient from the meta-gradient",
                               training_only=True)
    model: str = option("conv4", "the network: " + network_help("classifier"))

    def __post_init__(self):
        check_inner_loop_options("PLATIPUS.Config", self.inner_lr, self.inner_steps, self.test_inner_steps)
        check_network_name("PLATIPUS.Config", self.model, "classifier")
        for name in ("num_samples", "train_samples"):
            if getattr(self, name) < 1:
                raise ConfigError("PLATIPUS.Config", name, f"must be at least 1, got {getattr(self, name)}")
        require_number(self.kl_weight, "PLATIPUS.Config", "kl_weight", zero_allowed=True)
        require_number(self.std_init, "PLATIPUS.Config", "std_init")
        require_number(self.prior_step_init, "PLATIPUS.Config", "prior_step_init", zero_allowed=True)
        require_number(self.posterior_step_init, "PLATIPUS.Config", "posterior_step_init", zero_allowed=True)


def diagonal_gaussian_kl(mean_q: Params, log_std_q: Params, mean_p: Params, log_std_p: Params) -> Tensor:
    """D_KL(N(mean_q, diag exp(log_std_q)^2) || N(mean_p, diag exp(log_std_p)^2)), summed over
    every entry of every tensor of the dicts (the closed form for diagonal Gaussians)::

        sum  log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2
    """
    total = 0.0
    for name, m_q in mean_q.items():
        lq, lp = log_std_q[name], log_std_p[name]
        ratio = torch.exp(2 * (lq - lp)) + (m_q - mean_p[name]).square() * torch.exp(-2 * lp)
        total = total + (lp - lq + 0.5 * ratio - 0.5).sum()
    return total


OMNIGLOT_KL_WEIGHT = 1e-4  # the classification default; see PLATIPUS.paper_defaults


def bound_weight(noise_std: float, query_points: int) -> float:
    """The KL weight that makes ``MSE + weight * KL`` proportional to the negative variational
    bound when targets carry Gaussian noise of ``noise_std`` and the query set has
    ``query_points`` points: sum_n (y - f)^2 / (2 noise^2) = n / (2 noise^2) * MSE."""
    return 2 * noise_std**2 / max(query_points, 1)


class PLATIPUS(MetaLearner):
    """Probabilistic MAML (Finn, Xu & Levine 2018): a learned Gaussian over MAML's initial
    parameters, trained with a variational bound; samples several adapted models per task."""

    name = "platipus"
    Config = PLATIPUSConfig
    fixed_ways = True

    def __init__(self, model: nn.Module, config: PLATIPUSConfig = PLATIPUSConfig()):
        super().__init__()
        require_functional_model(model, "PLATIPUS", not config.first_order)
        self.model = model  # its parameters are mu_theta
        self.config = config
        self._keys = {name: name.replace(".", "__") for name, _ in model.named_parameters()}

        def log_stds() -> nn.ParameterDict:
            return nn.ParameterDict({key: nn.Parameter(torch.full_like(p.detach(), math.log(config.std_init)))
                                     for key, p in zip(self._keys.values(), model.parameters())})

        self.log_prior_std = log_stds()  # log sigma_theta
        self.log_posterior_std = log_stds()  # log sqrt(v_q)
        self.prior_step = nn.Parameter(torch.tensor(float(config.prior_step_init)))  # gamma_p
        self.posterior_step = nn.Parameter(torch.tensor(float(config.posterior_step_init)))  # gamma_q

    @classmethod
    def build(cls, config: PLATIPUSConfig, problem: Problem) -> "PLATIPUS":
        """PLATIPUS on the network ``config.model`` (:func:`metalearn.models.build_model`), whose
        weights are the mean of the prior over models, with one output per class of ``problem``
        (or its regression output size)."""
        return cls(build_model(config.model, problem.input_shape, problem.output_dim), config)

    @classmethod
    def paper_defaults(cls, task, given: dict | None = None) -> tuple[dict, dict]:
        if not task.classification:
            # Section 6, ambiguous sinusoid-or-line regression from 5 noisy points. Network and
            # inner loop as MAML's sinusoid setup (2x40 MLP, alpha 0.01, 1 step in training and
            # 1 at test time as for MAML on this dataset, meta-batch 25, 70k steps): more steps
            # blow up on steep lines, in training the second-order meta-gradient, at test time
            # the adapted functions (MAML's 70k-step run, results/maml-sine-or-line, has a mean MSE
            # over 10^4 after 4 of 10 test steps, a non-finite one from step 6). kl_weight = 2 * 0.3^2 / 5:
            # with the tasks' Gaussian noise (std 0.3) on K = 5 query points, MSE + kl_weight *
            # KL is the negative bound of section 4 up to a constant factor. sigma_theta and
            # sqrt(v_q) start at 0.1 so that samples differ visibly from the start. Noiseless
            # tasks (sinusoid, --noise-std 0) take 0.3 as a nominal noise: the bound's weight
            # for no noise is 0, which would switch the prior off altogether.
            noise = task.noise_std or 0.3
            return ({"model": "mlp", "inner_lr": 0.01, "inner_steps": 1, "test_inner_steps": 1,
                     "num_samples": 10, "train_samples": 1, "kl_weight": bound_weight(noise, task.query),
                     "prior_step_init": 0.01, "posterior_step_init": 0.01, "std_init": 0.1},
                    {"meta_batch_size": 25, "steps": 70000, "val_every": 5000, "checkpoint_every": 5000})
        # Classification uses MAML's network and settings (the paper builds on MAML's); gamma_p
        # and gamma_q start at alpha. kl_weight 1e-4, an empirical choice, not derived: on
        # Omniglot 5-way 1-shot the bound's weight, 1 / (query examples per task), let the KL
        # over Conv4's 112k weights dominate the loss and lose accuracy, from random weights and
        # from MAML's weights (trials not recorded). At 1e-4, from MAML's weights, it matches
        # MAML's accuracy (results/platipus-omniglot-5w1s); from random weights no run is recorded.
        # Part of the KL's size is std_init's: at initialisation sqrt(v_q) = sigma_theta =
        # std_init, so the KL is |gamma_q grad L_Q - gamma_p grad L_S|^2 / (2 std_init^2), a
        # factor 5,000 at 0.01, and the learned log-stds move slowly. Untested on 20-way and on
        # mini-ImageNet.
        kl_weight = OMNIGLOT_KL_WEIGHT
        if of_photographs(task.dataset):
            # as MAML's mini-ImageNet (alpha 0.01, 5 steps, 10 at test, meta-batch 4 / 2); untested
            return ({"model": "conv4-maxpool-32", "inner_lr": 0.01, "inner_steps": 5, "test_inner_steps": 10,
                     "prior_step_init": 0.01, "posterior_step_init": 0.01, "kl_weight": kl_weight},
                    {"meta_batch_size": 4 if task.shots == 1 else 2, "steps": 60000})
        if task.ways >= 20:
            # As MAML's 20-way Omniglot: alpha 0.1, 5 inner steps, meta-batch 16.
            return ({"model": "conv4", "inner_lr": 0.1, "inner_steps": 5, "test_inner_steps": 5,
                     "prior_step_init": 0.1, "posterior_step_init": 0.1, "kl_weight": kl_weight},
                    {"meta_batch_size": 16, "steps": 60000})
        # 5-way Omniglot as MAML: alpha 0.4, 1 inner step (3 at test time), meta-batch 32.
        return ({"model": "conv4", "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3,
                 "prior_step_init": 0.4, "posterior_step_init": 0.4, "kl_weight": kl_weight},
                {"meta_batch_size": 32, "steps": 60000})

    # -- the pure functions ------------------------------------------------------------------

    def _forward(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

    def shifted_mean(self, mean: Params, x: Tensor, y: Tensor, step_size: Tensor) -> Params:
        """``mean - step_size * grad_mean L(mean, (x, y))``: the mean of q (step gamma_q, the
        query set; Algorithm 1 line 7) or of p(theta | D_tr) (step gamma_p, the support set;
        line 10 and Algorithm 2 line 1). One task, no task axis."""
        return sgd_step(mean, loss_gradient(self.model, mean, x, y, self.config.first_order), step_size)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int) -> list[Params]:
        """MAML's inner loop from a sampled theta: the parameters after 0..steps gradient steps
        of size alpha on the support set (Algorithm 1 lines 8-9, Algorithm 2 lines 2-3)."""
        return gradient_descent(self.model, params, support_x, support_y, steps, self.config.inner_lr,
                                self.config.first_order)

    def _mean(self) -> Params:
        return dict(self.model.named_parameters())

    def _log_std(self, table: nn.ParameterDict) -> Params:
        return {name: table[key] for name, key in self._keys.items()}

    def standard_normal(self, tasks: int, samples: int, generator: torch.Generator | None = None) -> Params:
        """The noise eps of ``theta = mean + std * eps``: per parameter ``(tasks, samples, *shape)``.
        Drawn on the generator's device (the CPU for torch's global generator, used when
        ``generator`` is None) and then moved to the weights' device: a seed gives the same
        models on any device, and a CPU generator (what the evaluators pass) works with weights
        on a GPU. Drawn in float32 and then given the weights' type: a seed gives the same models
        to a float64 or bfloat16 learner (``learner.to(dtype)``), not other draws."""
        source = generator.device if generator is not None else torch.device("cpu")
        return {name: torch.randn((tasks, samples, *p.shape), generator=generator, dtype=torch.float32,
                                  device=source).to(p.device, p.dtype)
                for name, p in self.model.named_parameters()}

    def kl(self, batch: TaskBatch) -> Tensor:
        """D_KL(q(theta | D_tr, D_test) || p(theta | D_tr)) per task, ``(tasks,)``."""
        mean = self._mean()
        log_q, log_p = self._log_std(self.log_posterior_std), self._log_std(self.log_prior_std)

        def one_task(support_x, support_y, query_x, query_y):
            mean_q = self.shifted_mean(mean, query_x, query_y, self.posterior_step)
            mean_p = self.shifted_mean(mean, support_x, support_y, self.prior_step)
            return diagonal_gaussian_kl(mean_q, log_q, mean_p, log_p)

        return vmap(one_task, randomness="different")(batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    # -- the interface -----------------------------------------------------------------------

    @classmethod
    def series_labels(cls, config: dict[str, Any]) -> dict[str, str]:
        # the logged accuracy samples theta from q, whose mean took a step on the query labels
        # it is then scored on (Algorithm 1, lines 6-7): above what predict (from p) scores
        return {"accuracy": "training accuracy (%, meta-batch, theta from q: saw the query labels)"}

    def meta_loss(self, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The negative bound (Algorithm 1 line 11), averaged over tasks: the query loss of the
        adapted samples (mean over ``train_samples``) + ``kl_weight`` * D_KL(q || p). Noise from
        the global generator (the trainer seeds it per step)."""
        check_network_fits(self, batch, training=True, network=self.model)
        mean = self._mean()
        log_q, log_p = self._log_std(self.log_posterior_std), self._log_std(self.log_prior_std)
        std_q = {name: s.exp() for name, s in log_q.items()}
        steps = self.config.inner_steps
        classification = batch.is_classification
        noise = self.standard_normal(batch.num_tasks, self.config.train_samples)

        def one_task(support_x, support_y, query_x, query_y, eps):
            mean_q = self.shifted_mean(mean, query_x, query_y, self.posterior_step)  # lines 6-7
            mean_p = self.shifted_mean(mean, support_x, support_y, self.prior_step)  # line 10

            def one_sample(eps_one):
                theta = {name: mean_q[name] + std_q[name] * eps_one[name] for name in mean_q}  # line 7
                phi = self.adapt(theta, support_x, support_y, steps)[-1]  # lines 8-9
                prediction = self._forward(phi, query_x)
                return task_loss(prediction, query_y), prediction

            losses, predictions = vmap(one_sample, randomness="different")(eps)
            kl = diagonal_gaussian_kl(mean_q, log_q, mean_p, log_p)
            if classification:
                mixture = torch.logsumexp(predictions.log_softmax(-1), 0)  # log(S * mean prob)
                return losses.mean(), kl, (mixture.argmax(-1) == query_y).float().mean()
            return losses.mean(), kl, torch.zeros(())

        query_losses, kls, accuracies = vmap(one_task, randomness="different")(batch.support_x, batch.support_y, batch.query_x,
                                                       batch.query_y, noise)
        loss = (query_losses + self.config.kl_weight * kls).mean()
        metrics = {"loss": loss.detach(), "query_loss": query_losses.mean().detach(), "kl": kls.mean().detach(),
                   "prior_std": torch.cat([s.detach().exp().flatten() for s in log_p.values()]).mean()}
        if classification:
            metrics["accuracy"] = accuracies.mean()
        return loss, metrics

    def sample_predictions_per_step(self, batch: TaskBatch, num_samples: int | None = None,
                                    generator: torch.Generator | None = None) -> Tensor:
        """Algorithm 2 for every task and sample: theta ~ p(theta | D_tr), then the query outputs
        (logits or regression values) after 0..test_inner_steps gradient steps from it.
        Returns ``(steps + 1, samples, tasks, n_query, out)``."""
        return self._sample_predictions(batch, num_samples, generator, final_only=False)

    def _sample_predictions(self, batch: TaskBatch, num_samples: int | None, generator: torch.Generator | None,
                            final_only: bool) -> Tensor:
        """:meth:`sample_predictions_per_step`, or with ``final_only`` the query pass after the
        last step alone, ``(1, samples, tasks, n_query, out)``: the same numbers as the last of
        all (the same noise, drawn before any pass), for one query pass instead of steps + 1."""
        check_network_fits(self, batch, network=self.model)
        if num_samples is None:
            num_samples = self.config.num_samples
        num_samples = check_count(num_samples, "num_samples", message="{name} must be a whole number of at least "
                                  f"{{least}} (or None: the run's {self.config.num_samples}), got {{value!r}}")
        mean = {name: p.detach() for name, p in self._mean().items()}
        std_p = {name: s.detach().exp() for name, s in self._log_std(self.log_prior_std).items()}
        prior_step = self.prior_step.detach()
        steps = self.config.test_inner_steps
        noise = self.standard_normal(batch.num_tasks, num_samples, generator)
        scored = range(steps, steps + 1) if final_only else range(steps + 1)

        def one_task(support_x, support_y, query_x, eps):
            mean_p = self.shifted_mean(mean, support_x, support_y, prior_step)

            def one_sample(eps_one):
                theta = {name: mean_p[name] + std_p[name] * eps_one[name] for name in mean_p}
                trajectory = self.adapt(theta, support_x, support_y, steps)
                return torch.stack([self._forward(trajectory[j], query_x) for j in scored])

            return vmap(one_sample, randomness="different")(eps)  # (samples, scored steps, n_query, out)

        # torch.func.grad still differentiates the inner loop, once: the native batch norm is right
        with torch.no_grad(), first_order_batch_norm():
            per_task = vmap(one_task, randomness="different")(batch.support_x, batch.support_y, batch.query_x, noise)
        return per_task.permute(2, 1, 0, *range(3, per_task.dim()))

    def sample_predictions(self, batch: TaskBatch, num_samples: int | None = None,
                           generator: torch.Generator | None = None) -> Tensor:
        """The query outputs of ``num_samples`` (default ``config.num_samples``) sampled and
        adapted models per task: ``(samples, tasks, n_query, out)``; logits for classification."""
        return self._sample_predictions(batch, num_samples, generator, final_only=True)[0]

    def predict(self, batch: TaskBatch) -> Tensor:
        """The average prediction of ``config.num_samples`` sampled and adapted models per task
        (:meth:`sample_predictions`): for classification the log of the mean softmax probability,
        (tasks, n_query, ways), so that argmax and NLL work; for regression the mean output."""
        return average_prediction(self.sample_predictions(batch), batch.is_classification)

    def sample_probabilities(self, support_x, support_y, query_x, num_samples: int | None = None,
                             generator: torch.Generator | None = None, **prepare) -> Tensor:
        """One task's class probabilities under each of ``num_samples`` sampled and adapted
        models, ``(samples, n_query, ways)``: their mean is :meth:`fit_predict`'s answer (for the
        run's ``num_samples`` and up to ``QUERY_CHUNK`` queries, which fit_predict classifies in
        one pass), their standard deviation the spread between models. Inputs as
        :meth:`task_batch` takes them; in eval mode, as :meth:`fit_predict`. ``generator``: where
        the models are drawn from; None: a generator seeded as fit_predict's and ``metalearn
        predict``'s (:func:`~metalearn.algorithms.base.prediction_generator`), so two calls give the
        same models and torch's global random state is left alone."""
        batch = self.task_batch(support_x, support_y, query_x, **prepare)
        with evaluating(self):
            return probabilities(self.sample_predictions(batch, num_samples, prediction_generator(generator))[:, 0])

    def predict_per_step(self, batch: TaskBatch) -> Tensor:
        """The samples' average prediction after each step: for classification the log of the
        mean softmax probability (so argmax and NLL work), for regression the mean output.
        ``(steps + 1, tasks, n_query, out)``."""
        samples = self.sample_predictions_per_step(batch)
        return average_prediction(samples, batch.is_classification, dim=1)
