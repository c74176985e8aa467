"""MAML for reinforcement learning (Finn, Abbeel & Levine, ICML 2017, section 3.2 and 5.3):
a Gaussian MLP policy meta-trained so that one policy-gradient step on a new MDP's trajectories
adapts it; the meta-update is TRPO through that step.

Per meta-batch of MDPs (an :class:`~metalearn.envs.MDPBatch`): roll out ``trajectories``
episodes per task with the policy theta; fit a linear feature baseline per task (rllab's
``LinearFeatureBaseline``, cited by the paper) and take the vanilla policy gradient (REINFORCE)
step theta' = theta - alpha grad L_task(theta); roll out theta' and maximise the mean over tasks
of the importance-weighted advantage of those trajectories under theta'(theta), subject to a
mean KL between the old and new adapted policies of at most ``max_kl`` (TRPO, Schulman et al.
2015: conjugate gradient on the Fisher-vector product, the Hessian of that KL through the
adaptation, then a backtracking line search). ``inner_steps 0`` trains one policy on all tasks
jointly: the paper's "pretrained" baseline. Rollouts step all tasks and trajectories as one
tensor; the inner steps are ``vmap``'ped over tasks. Under torchrun each rank rolls out and
adapts its share of the tasks, and the TRPO step stays one trust region over the whole
meta-batch: its gradient, every Fisher-vector product and each line-search evaluation are
all-reduced (means over all the tasks), so every rank takes the step one process would. Every
random draw of a task's rollouts comes from that task's seed (``MDPBatch.seeds``).

Example::

    >>> from metalearn.envs.nav2d import Nav2D
    >>> from metalearn.envs import MDPTasks
    >>> learner = MAMLRL(GaussianMLPPolicy(2, 2), MAMLRL.Config())
    >>> batch = MDPTasks(Nav2D()).sample(20, torch.Generator().manual_seed(0))
    >>> loss, metrics = learner.meta_loss(batch)   # its gradient is minus the TRPO step
    >>> scores = learner.episode_scores(batch)     # (test_inner_steps + 1, tasks) average returns
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metalearn.algorithms.base import MetaLearner, Problem, floating_dtype
from metalearn.algorithms.inner_loop import MAX_INNER_STEPS
from metalearn.distributed import current_world
from metalearn.errors import ConfigError, require_number
from metalearn.options import option, options

Params = dict[str, Tensor]

LINE_SEARCH_STEPS = 15      # rllab's ConjugateGradientOptimizer: max_backtracks
BACKTRACK_RATIO = 0.8       # and backtrack_ratio
BASELINE_REG = 1e-5         # LinearFeatureBaseline's reg_coeff

# the trainer's settings under which its optimiser applies the TRPO surrogate's gradient as it
# is, so that the meta-update is exactly the TRPO step (``outer`` trpo): plain SGD at rate 1, no
# clipping, no schedule. Any other value changes the step while the logged KL stays TRPO's.
TRPO_TRAIN_SETTINGS = {"meta_optimizer": "sgd", "meta_lr": 1.0, "grad_clip": 0.0, "lr_anneal": "none",
                       "lr_halve_every": 0}
# the meta-optimiser of ``outer`` gradient where the user names none: the authors' first-order
# outer loop (``MAMLVPG`` in cbfinn/maml_rl: rllab's ``FirstOrderOptimizer``, one Adam step at
# 1e-3 on the meta-objective per meta-iteration)
GRADIENT_TRAIN_DEFAULTS = {"meta_optimizer": "adam", "meta_lr": 1e-3}


@options
class MAMLRLConfig:
    """The paper's settings (appendix A.2 and the authors' ``maml_rl`` code) are the defaults."""

    inner_lr: float = option(0.1, "step size of the policy-gradient step on a task's trajectories (MAML's alpha)")
    inner_steps: int = option(1, "policy-gradient steps per task during meta-training; 0 trains one policy on all "
                                 "tasks jointly (the paper's pretrained baseline)", training_only=True, memory="fewer")
    test_inner_steps: int = option(3, "policy-gradient steps at evaluation; the return is scored before each "
                                      "and after the last")
    test_lr_decay: float = option(0.5, "the inner step size of test-time steps after the first, as a fraction of "
                                       "--inner-lr (the paper halves it)")
    trajectories: int = option(20, "trajectories per task for each policy-gradient step and for the meta-objective "
                                   "(the paper's K)", training_only=True, memory="fewer")
    test_trajectories: int = option(40, "trajectories per task for each step at evaluation (the authors' "
                                        "evaluation: 40 for nav2d, 20 for the half-cheetahs)")
    horizon: int = option(0, "steps per trajectory (0: the environment's, 100 for nav2d, 200 for half-cheetah)",
                          memory="a shorter")
    discount: float = option(0.99, "discount of the returns the baseline and the advantages use")
    first_order: bool = option(False, "drop the second derivatives of the inner step from the meta-objective",
                               training_only=True)
    outer: str = option("trpo", "the meta-update: trpo (the paper's), or gradient: the meta-objective's gradient, "
                                "applied by --meta-optimizer at --meta-lr", training_only=True)
    max_kl: float = option(0.01, "TRPO's bound on the mean KL between the adapted policies before and after the "
                                 "meta-update", training_only=True)
    cg_iters: int = option(10, "conjugate-gradient iterations of the TRPO step", training_only=True)
    cg_damping: float = option(1e-5, "damping added to the Fisher-vector product", training_only=True)
    hidden: int = option(100, "units in each of the policy's two hidden ReLU layers", memory="a smaller")

    def __post_init__(self):
        owner = "MAMLRL.Config"
        require_number(self.inner_lr, owner, "inner_lr")
        require_number(self.max_kl, owner, "max_kl")
        require_number(self.discount, owner, "discount")
        require_number(self.test_lr_decay, owner, "test_lr_decay")
        require_number(self.cg_damping, owner, "cg_damping", zero_allowed=True)
        if self.discount > 1:
            raise ConfigError(owner, "discount", f"must be at most 1, got {self.discount}")
        for name, least in (("inner_steps", 0), ("test_inner_steps", 0), ("trajectories", 2),
                            ("test_trajectories", 2), ("horizon", 0), ("cg_iters", 1), ("hidden", 1)):
            if getattr(self, name) < least:
                raise ConfigError(owner, name, f"must be at least {least}, got {getattr(self, name)}")
        for name in ("inner_steps", "test_inner_steps"):  # MAML's bound: a mistyped 10**8 would run for days
            if getattr(self, name) > MAX_INNER_STEPS:
                raise ConfigError(owner, name, f"must be at most {MAX_INNER_STEPS} (each step a policy-gradient "
                                               f"step on sampled trajectories), got {getattr(self, name)}")
        if self.outer not in ("trpo", "gradient"):
            raise ConfigError(owner, "outer", f"must be trpo or gradient, got {self.outer!r}")
        if self.first_order and self.inner_steps == 0:  # accepted silently, it would change nothing
            raise ConfigError(owner, "first_order", "drops the second derivatives of the inner steps: it needs "
                                                    "`inner_steps` of at least 1, got 0 (no inner step: one policy "
                                                    "trained on all tasks)")


class GaussianMLPPolicy(nn.Module):
    """pi(a | s) = N(mean(s), diag(exp(log_std))^2): ``mean`` an MLP with two hidden ReLU layers
    (the paper's 100 units), ``log_std`` one learned vector independent of the state (rllab's
    ``GaussianMLPPolicy``: Glorot-uniform weights, zero biases, standard deviation 1 at first).
    Forward: observations (..., observation_dim) -> (mean, log_std), each (..., action_dim)."""

    def __init__(self, observation_dim: int, action_dim: int, hidden: int = 100):
        super().__init__()
        self.mean = nn.Sequential(nn.Linear(observation_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, action_dim))
        for layer in self.mean:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.zeros(action_dim))

    def forward(self, observations: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.mean(observations)
        return mean, self.log_std.expand_as(mean)


# -- the pieces, as pure functions -----------------------------------------------------------


def gaussian_log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(actions; mean, diag(exp(log_std))^2), summed over the last (action) axis."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean0: Tensor, log_std0: Tensor, mean1: Tensor, log_std1: Tensor) -> Tensor:
    """KL(N0 || N1) of diagonal Gaussians, summed over the last axis."""
    var0, var1 = torch.exp(2 * log_std0), torch.exp(2 * log_std1)
    return (log_std1 - log_std0 + (var0 + (mean0 - mean1).square()) / (2 * var1) - 0.5).sum(-1)


def masked_mean(values: Tensor, mask: Tensor, dims: tuple[int, ...]) -> Tensor:
    return (values * mask).sum(dims) / mask.sum(dims).clamp_min(1)


def baseline_features(observations: Tensor) -> Tensor:
    """rllab's ``LinearFeatureBaseline`` features of every step: the observation clipped to
    [-10, 10], its square, t, t^2, t^3 (t = step / 100) and 1. observations (..., H, d) ->
    (..., H, 2d + 4)."""
    obs = observations.clamp(-10, 10)
    horizon = observations.shape[-2]
    t = (torch.arange(horizon, dtype=obs.dtype, device=obs.device) / 100.0).view(-1, 1).expand(*obs.shape[:-1], 1)
    return torch.cat([obs, obs.square(), t, t.square(), t ** 3, torch.ones_like(t)], -1)


def fit_linear_baseline(observations: Tensor, mask: Tensor, targets: Tensor, reg: float = BASELINE_REG) -> Tensor:
    """Fit the linear feature baseline of each task to ``targets`` (the discounted returns) by
    ridge regression over that task's steps (masked ones excluded), as rllab's
    ``LinearFeatureBaseline.fit`` (its regulariser raised tenfold, up to five times, while the
    solution is not finite: each task's own, so that a task's baseline depends on its steps
    alone, as a fit per task in rllab), and return its predictions at every step.

    observations: (tasks, trajectories, H, d); mask, targets: (tasks, trajectories, H).
    Solved in float64; returns (tasks, trajectories, H) in ``targets``' dtype."""
    features = baseline_features(observations.double())
    weights = mask.double().unsqueeze(-1)
    x = (features * weights).flatten(1, 2)                     # (tasks, N*H, F)
    y = (targets.double() * mask.double()).flatten(1, 2)       # (tasks, N*H)
    gram, moment = x.transpose(1, 2) @ x, (x.transpose(1, 2) @ y.unsqueeze(-1))
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    coefficients = torch.linalg.solve(gram + reg * eye, moment)  # (tasks, F, 1)
    for attempt in range(1, 5):
        failed = ~torch.isfinite(coefficients).all(dim=(1, 2))
        if not failed.any():
            break
        coefficients[failed] = torch.linalg.solve(gram[failed] + reg * 10 ** attempt * eye, moment[failed])
    return (features @ coefficients.unsqueeze(1)).squeeze(-1).to(targets.dtype)


def advantages(trajectories, discount: float, dtype: torch.dtype | None = None) -> Tensor:
    """Per step: discounted return-to-go minus the task's fitted baseline (GAE with lambda 1),
    standardised over each task's steps (rllab's ``center_adv``); 0 on masked steps.
    (tasks, trajectories, H), of ``dtype``: the policy's, in which they enter its loss (default:
    the rewards').

    The returns-to-go are the environment's, computed in its type (the rewards'); the baseline is
    fitted in float64, and the standardisation is computed in the wider of the environment's type
    and ``dtype`` (a bfloat16 policy's advantages are standardised in float32, then rounded)."""
    env_dtype = trajectories.rewards.dtype
    dtype = dtype or env_dtype
    work = torch.promote_types(env_dtype, dtype)
    returns = trajectories.rewards_to_go(discount).to(work)
    mask = trajectories.mask.to(work)
    values = fit_linear_baseline(trajectories.observations, mask, returns)
    raw = returns - values
    mean = masked_mean(raw, mask, (1, 2)).view(-1, 1, 1)
    std = masked_mean((raw - mean).square(), mask, (1, 2)).sqrt().view(-1, 1, 1)
    return ((raw - mean) / (std + 1e-8) * mask).to(dtype)


def policy_inputs(trajectories, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(observations, actions, mask) of ``trajectories`` as a policy of ``dtype`` reads them: the
    environment keeps them in its own type (float32 for the built-in ones), the policy's
    log-probabilities and loss are computed in its type (a float64 policy's gradients float64)."""
    return (trajectories.observations.to(dtype), trajectories.actions.to(dtype), trajectories.mask.to(dtype))


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       tolerance: float = 1e-10) -> Tensor:
    """Approximately solve A x = b for a symmetric positive definite A given as ``matvec``
    (Hestenes & Stiefel; at most ``iters`` products, stopping once |r|^2 < ``tolerance``)."""
    x = torch.zeros_like(b)
    residual, direction = b.clone(), b.clone()
    rr = residual @ residual
    for _ in range(iters):
        if rr < tolerance:
            break
        product = matvec(direction)
        alpha = rr / (direction @ product)
        x = x + alpha * direction
        residual = residual - alpha * product
        new_rr = residual @ residual
        direction = residual + (new_rr / rr) * direction
        rr = new_rr
    return x


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: Params) -> Params:
    out, start = {}, 0
    for name, p in like.items():
        out[name] = vector[start:start + p.numel()].view_as(p)
        start += p.numel()
    return out


def kl_hessian_vector(kl: Tensor, leaves: list[Tensor], damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    """v -> (H + damping I) v, H the Hessian of the scalar ``kl`` in ``leaves``: the gradient is
    built once with its graph, each product is one more backward pass (Pearlmutter's trick).
    At the old policy, where the KL and its gradient vanish, H is the Fisher matrix of the
    adapted policies through the inner step. (Applying it as J^T G J instead, J the Jacobian of
    the adaptation by jvp and vjp and G the Gaussian's Fisher matrix in its outputs, gives the
    same product in the same time on nav2d's meta-batch.)"""
    kl_grad = flat(torch.autograd.grad(kl, leaves, create_graph=True))

    def product(v: Tensor) -> Tensor:
        return flat(torch.autograd.grad(kl_grad @ v, leaves, retain_graph=True)) + damping * v

    return product


def trpo_step(objective: Callable[[Params], tuple[Tensor, Tensor]], params: Params, max_kl: float,
              cg_iters: int = 10, damping: float = 1e-5,
              reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Params, dict[str, float]]:
    """One TRPO update of ``params`` (leaf tensors that require grad) for ``objective(params) ->
    (loss, mean KL from the old policy)``, whose KL is 0 with a zero gradient at ``params``.

    The search direction solves (F + damping I) s = -grad loss by conjugate gradient, F the
    Hessian of the KL at ``params`` (:func:`kl_hessian_vector`: the Fisher matrix through
    whatever the objective computes from ``params``, here the inner adaptation); the step is
    scaled to KL ``max_kl`` in
    the quadratic model, then shrunk by 0.8 until the loss improves and the KL is within the
    bound, up to 15 times; no step if none is (rllab's ``ConjugateGradientOptimizer``). Returns
    the new parameters (detached) and diagnostics.

    ``reduce`` (torchrun): ``objective`` covers this rank's tasks, and ``reduce`` turns a value
    of them (the loss, the KL, their gradients and Fisher-vector products) into the value over
    all ranks' tasks (a sum of the ranks' values, each weighted by its share of the tasks), so
    that every decision is taken on the same numbers on every rank."""
    reduce = reduce or (lambda value: value)
    leaves = list(params.values())
    loss, kl = objective(params)
    loss_grad = reduce(flat(torch.autograd.grad(loss, leaves, retain_graph=True)).detach())
    local_product = kl_hessian_vector(kl, leaves)

    def product(v: Tensor) -> Tensor:
        return reduce(local_product(v)) + damping * v

    direction = conjugate_gradient(product, -loss_grad, cg_iters)
    curvature = direction @ product(direction)
    full_step = torch.sqrt(2 * max_kl / (curvature + 1e-8)) * direction
    old = flat(leaves).detach()
    loss_before = float(reduce(loss.detach()))
    info = {"loss_before": loss_before, "loss_after": loss_before, "kl": 0.0, "backtracks": float(LINE_SEARCH_STEPS)}
    chosen = old
    with torch.no_grad():
        for backtrack in range(LINE_SEARCH_STEPS):
            candidate = old + BACKTRACK_RATIO ** backtrack * full_step
            new_loss, new_kl = reduce(torch.stack(objective(unflat(candidate, params))))
            if float(new_loss) < loss_before and float(new_kl) <= max_kl:
                chosen = candidate
                info.update(loss_after=float(new_loss), kl=float(new_kl), backtracks=float(backtrack))
                break
    return {name: t.clone() for name, t in unflat(chosen, params).items()}, info


# -- the method --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaObjective:
    """One meta-batch's meta-objective, its trajectories already sampled, as functions of the
    policy's parameters theta (a dict of tensors; the trajectories' dependence on theta is not
    differentiated, as in the paper's code):

    - ``adapted(theta)``: each task's parameters after the inner steps (leading task axis);
    - ``objective(theta)``: (minus the mean over tasks of the importance-weighted advantage of
      the adapted policies' trajectories, the mean over tasks of the KL from the adapted
      policies that sampled them), means over each task's unmasked steps;
    - ``metrics``: returns and speed of the sampling;
    - ``inner``: the (trajectories, advantages) of each inner step; ``evaluation``, ``advantage``
      and ``old_log_prob``: the adapted policies' trajectories, their advantages and their
      log-probabilities under the policies that drew them. The trajectories are of the
      environment's type, the advantages and log-probabilities of the policy's."""

    adapted: Callable[[Params], Params]
    objective: Callable[[Params], tuple[Tensor, Tensor]]
    metrics: dict[str, Tensor]
    inner: list
    evaluation: Any
    advantage: Tensor
    old_log_prob: Tensor


class MAMLRL(MetaLearner):
    """MAML with a policy-gradient inner step and a TRPO meta-update, on an
    :class:`~metalearn.envs.MDPBatch`. ``meta_loss`` returns a surrogate whose gradient is minus
    the TRPO step, 0.5 * |theta - sg(theta_new)|^2 (as Reptile's), so the trainer's SGD at
    ``meta_lr`` 1 (the paper defaults) takes exactly that step; :meth:`check_run` refuses the
    trainer settings that would apply it otherwise. ``outer`` gradient hands the meta-objective's
    gradient to the trainer's optimiser instead (Adam at 1e-3 unless the user names one)."""

    name = "maml-rl"
    Config = MAMLRLConfig
    reinforcement = True
    default_dataset = "nav2d"
    network_attribute = "policy"  # what --init-from copies
    # the options that a run's test returns depend on besides its weights: `plot --compare`
    # refuses two runs that differ in one (their curves would share an axis but not a scale)
    scored_options = ("horizon", "discount", "test_trajectories", "test_inner_steps", "inner_lr", "test_lr_decay")

    def __init__(self, policy: nn.Module, config: MAMLRLConfig = MAMLRLConfig()):
        super().__init__()
        self.policy = policy
        self.config = config

    @classmethod
    def build(cls, config: MAMLRLConfig, problem: Problem) -> "MAMLRL":
        return cls(GaussianMLPPolicy(problem.input_shape[0], problem.output_dim, config.hidden), config)

    @classmethod
    def paper_defaults(cls, task, given: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Finn et al. 2017, section 5.3 and appendix A.2: meta-batch 20 (2D navigation) or 40
        (locomotion); the authors' point runs took 100 meta-iterations, their locomotion runs 500
        at most. The meta-optimiser follows ``outer`` in ``given`` (the method options the user
        gave): TRPO's step is the surrogate's gradient, taken by SGD at rate 1
        (:data:`TRPO_TRAIN_SETTINGS`); the gradient outer loop takes Adam at 1e-3, the authors'
        first-order outer loop (:data:`GRADIENT_TRAIN_DEFAULTS`)."""
        nav = task.dataset == "nav2d"
        outer = (given or {}).get("outer", MAMLRLConfig.outer)
        optimiser = GRADIENT_TRAIN_DEFAULTS if outer == "gradient" else {
            name: TRPO_TRAIN_SETTINGS[name] for name in ("meta_optimizer", "meta_lr")}
        return {}, {"meta_batch_size": 20 if nav else 40, "steps": 100 if nav else 500, **optimiser,
                    "log_every": 1, "checkpoint_every": 10, "val_every": 0, "eval_episodes": 100 if nav else 40}

    def check_run(self, config: Any) -> None:
        """Refuse training options that this method's meta-update would not honour:

        - with ``outer`` trpo, any trainer setting that changes how the surrogate's gradient is
          applied (:data:`TRPO_TRAIN_SETTINGS`: another meta-optimiser or rate, clipping, a
          learning-rate schedule): the update would no longer be the TRPO step whose KL the
          metrics log (Adam's rescaled step makes every later line search fail);
        - ``keep_best``: its checkpoints serve ``metalearn eval --ensemble``, which averages
          predictions and which this method refuses (a policy's returns do not average so)."""
        train = config.train
        if train.keep_best:
            raise ConfigError("TrainConfig", "keep_best", f"does not apply to {self.name}: its checkpoints serve "
                                                          "`metalearn eval --ensemble`, which averages predictions, "
                                                          "and a policy's returns do not average that way; leave it "
                                                          f"at 0 (got {train.keep_best})")
        if self.config.outer != "trpo":
            return
        changed = [name for name, value in TRPO_TRAIN_SETTINGS.items() if getattr(train, name) != value]
        if changed:
            shown = lambda value: f"{value:g}" if isinstance(value, float) else str(value)  # noqa: E731
            wanted = ", ".join(f"`{name}` {shown(TRPO_TRAIN_SETTINGS[name])}" for name in changed)
            got = ", ".join(shown(getattr(train, name)) for name in changed)
            raise ConfigError("TrainConfig", tuple(changed),
                              f"would change the TRPO meta-update of `MAMLRL.Config.outer` trpo (the default), which the trainer "
                              f"takes exactly only with {wanted} (got {got}); give `MAMLRL.Config.outer` gradient to apply the "
                              f"meta-gradient with {'it' if len(changed) == 1 else 'them'}")

    def chunking_refused(self) -> str | None:
        if self.config.outer == "trpo":
            return (f"{self.name}'s TRPO step (each Fisher-vector product needs every task's adaptation graph at "
                    "once; share the meta-batch among torchrun's ranks instead)")
        return None

    # -- the policy, applied per task ------------------------------------------------------------

    def _distribution(self, params: Params, per_task: bool, observations: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, log_std) at ``observations`` (tasks, ...), under ``params`` shared by all tasks
        or, with ``per_task``, one set per task (leading task axis)."""
        if per_task:
            return vmap(lambda p, o: functional_call(self.policy, p, (o,)))(params, observations)
        return functional_call(self.policy, params, (observations,))

    def _rollout(self, batch, params: Params, per_task: bool, trajectories: int,
                 generators: list[torch.Generator] | None = None):
        """``trajectories`` episodes per task of the policy ``params``. Each task's draws (the
        environment's start, the actions' Gaussian noise) come from its own generator
        (default: ``batch.generators``), so that they do not depend on the other tasks of the
        batch: a torchrun rank with a share of the tasks draws what one process would. The
        environment runs in its own type (its observations'): the policy reads the observations in
        its type and hands its actions back in theirs."""
        from metalearn.envs import rollout

        horizon = self.config.horizon or batch.env.horizon
        sample = next(iter(params.values()))
        generators = generators if generators is not None else batch.generators(sample.device)
        reset_seeds = torch.stack([torch.randint(0, 2**62, (trajectories,), generator=g, device=sample.device).cpu()
                                   for g in generators])
        noise = torch.stack([torch.randn(trajectories, horizon, batch.env.action_dim, generator=g,
                                         device=sample.device, dtype=sample.dtype) for g in generators])
        step = iter(range(horizon))

        def act(observations: Tensor) -> Tensor:
            # the policy computes in its type; the environment gets its action in the observations' type
            mean, log_std = self._distribution(params, per_task, observations.to(sample.dtype))
            return (mean + torch.exp(log_std) * noise[:, :, next(step)]).to(observations.dtype)

        with torch.no_grad():
            return rollout(batch.env, batch.params, trajectories, act, horizon, reset_seeds)

    def _inner_loss(self, params: Params, observations: Tensor, actions: Tensor, advantage: Tensor,
                    mask: Tensor) -> Tensor:
        """One task's REINFORCE surrogate: minus the mean over its steps of log pi(a|s) * A."""
        mean, log_std = functional_call(self.policy, params, (observations,))
        return -masked_mean(gaussian_log_prob(actions, mean, log_std) * advantage, mask, (0, 1))

    def adapt(self, params: Params, per_task: bool, trajectories, advantage: Tensor, lr: float,
              first_order: bool = False) -> Params:
        """One policy-gradient step per task on its ``trajectories`` (with their ``advantage``):
        parameters with a leading task axis. A pure function of ``params`` (vmap over tasks)."""
        def step(p: Params, obs: Tensor, act: Tensor, adv: Tensor, mask: Tensor) -> Params:
            grads = grad(self._inner_loss)(p, obs, act, adv, mask)
            if first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            return {name: p[name] - lr * grads[name] for name in p}

        dtype = next(iter(params.values())).dtype
        observations, actions, mask = policy_inputs(trajectories, dtype)
        return vmap(step, in_dims=(0 if per_task else None, 0, 0, 0, 0))(
            params, observations, actions, advantage.to(dtype), mask)

    def _advantages(self, trajectories) -> Tensor:
        """:func:`advantages` of ``trajectories`` (the environment's type) in the policy's type."""
        return advantages(trajectories, self.config.discount, floating_dtype(self.policy))

    # -- meta-training -----------------------------------------------------------------------------

    def meta_objective(self, batch) -> "MetaObjective":
        """Sample the meta-batch's trajectories (theta's, then each adapted policy's) and return
        the meta-objective as functions of theta (see :class:`MetaObjective`). The environment
        runs in its own type (float32 for the built-in ones) whatever the policy's: the
        trajectories, their rewards and the returns of ``metrics`` are of it; the advantages,
        log-probabilities, objective and KL are of the policy's type."""
        config = self.config
        theta = dict(self.policy.named_parameters())
        env_time, env_steps = 0.0, 0
        generators = batch.generators(next(iter(theta.values())).device)

        def sample(params: Params, per_task: bool):
            nonlocal env_time, env_steps
            start = time.perf_counter()
            trajectories = self._rollout(batch, params, per_task, config.trajectories, generators)
            env_time += time.perf_counter() - start
            env_steps += trajectories.num_steps
            return trajectories

        # the data: trajectories of theta and of each adapted policy, then the last one's
        gathered, params, per_task = [], {k: v.detach() for k, v in theta.items()}, False
        returns = []
        for _ in range(config.inner_steps):
            trajectories = sample(params, per_task)
            advantage = self._advantages(trajectories)
            gathered.append((trajectories, advantage))
            returns.append(trajectories.returns().mean())
            params = self.adapt(params, per_task, trajectories, advantage, config.inner_lr)
            params, per_task = {k: v.detach() for k, v in params.items()}, True
        evaluation = sample(params, per_task)
        returns.append(evaluation.returns().mean())
        advantage = self._advantages(evaluation)
        observations, actions, mask = policy_inputs(evaluation, advantage.dtype)
        with torch.no_grad():
            old_mean, old_log_std = self._distribution(params, per_task, observations)
            old_log_prob = gaussian_log_prob(actions, old_mean, old_log_std)

        def adapted(theta: Params) -> Params:
            params, per_task = theta, False
            for trajectories, adv in gathered:
                params = self.adapt(params, per_task, trajectories, adv, config.inner_lr, config.first_order)
                per_task = True
            if not per_task:  # no inner step: every task's policy is theta
                params = {k: v.expand(batch.num_tasks, *v.shape) for k, v in params.items()}
            return params

        def objective(theta: Params) -> tuple[Tensor, Tensor]:
            mean, log_std = self._distribution(adapted(theta), True, observations)
            ratio = torch.exp(gaussian_log_prob(actions, mean, log_std) - old_log_prob)
            surrogate = masked_mean(ratio * advantage, mask, (1, 2)).mean()
            kl = masked_mean(gaussian_kl(old_mean, old_log_std, mean, log_std), mask, (1, 2)).mean()
            return -surrogate, kl

        metrics = {"return": returns[0].detach(), "env_steps_per_s": torch.tensor(env_steps / max(env_time, 1e-9))}
        if config.inner_steps:
            metrics["return_adapted"] = returns[-1].detach()
        return MetaObjective(adapted, objective, metrics, gathered, evaluation, advantage, old_log_prob)

    def meta_loss(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        """With ``outer`` trpo: 0.5 * |theta - sg(theta + TRPO step)|^2, whose gradient is minus
        the step; with ``outer`` gradient: minus the meta-objective, the adapted policies'
        average return, with the gradient of the importance-weighted surrogate (whose own value
        is 0 at theta: importance ratio 1, advantages standardised per task). Metrics: the
        average return of theta's trajectories (``return``) and of the adapted policies'
        (``return_adapted``), the KL of the step, its line-search backtracks, environment steps
        per second.

        Under torchrun ``batch`` is this rank's share of the meta-batch; the TRPO step is taken
        on all ranks' tasks (``trpo_step``'s ``reduce``), the same step on every rank."""
        theta = dict(self.policy.named_parameters())
        meta = self.meta_objective(batch)
        if self.config.outer == "gradient":
            surrogate, _ = meta.objective(theta)
            # the value logged (and checked for divergence by the trainer) is minus the sampled
            # return of the adapted policies, the meta-objective's estimate; the gradient is the
            # surrogate's. A non-finite surrogate stays non-finite (x - x is NaN for inf and NaN).
            adapted_return = meta.metrics.get("return_adapted", meta.metrics["return"])
            return surrogate - surrogate.detach() - adapted_return.to(surrogate.dtype), meta.metrics
        config = self.config
        device = next(iter(theta.values())).device
        world = current_world(device)
        reduce = None
        if world.distributed:
            all_tasks = world.sum(torch.tensor(float(batch.num_tasks), device=device))
            share = batch.num_tasks / all_tasks
            reduce = lambda value: world.sum(value * share.to(value.dtype))  # noqa: E731
        new, info = trpo_step(meta.objective, theta, config.max_kl, config.cg_iters, config.cg_damping, reduce)
        metrics = {**meta.metrics, "kl": torch.tensor(info["kl"]), "backtracks": torch.tensor(info["backtracks"])}
        surrogate = sum(0.5 * (p - new[name]).square().sum() for name, p in theta.items())
        if not math.isfinite(info["loss_before"]):
            # the line search takes no step on a non-finite objective, which would leave a loss of
            # 0 and a run that trains on silently; a non-finite loss makes the trainer stop with
            # its message (the same value on every rank: loss_before is summed over them)
            surrogate = surrogate + info["loss_before"]
        return surrogate, metrics

    @classmethod
    def series_labels(cls, config: dict[str, Any]) -> dict[str, str]:
        if config.get("outer", "trpo") == "trpo":
            return {"loss": "TRPO step, |step|^2 / 2 (meta-batch)"}
        if config.get("inner_steps", 1) == 0:  # no adaptation: the objective is theta's own return
            return {"loss": "minus the objective: -return (meta-batch)"}
        return {"loss": "minus the meta-objective: -return after adapting (meta-batch)"}

    # -- evaluation ----------------------------------------------------------------------------------

    def episode_scores(self, batch, per_step: bool = True) -> Tensor:
        """Average return per task (over ``test_trajectories`` episodes) before each of
        ``test_inner_steps`` policy-gradient steps and after the last: (steps + 1, tasks), or
        (1, tasks) with the final one alone; of the environment's type (float32 for the built-in
        ones), whatever the policy's."""
        scores = torch.stack([sampled.returns().mean(1)
                              for sampled in self.adapted_trajectories(batch, self.config.test_inner_steps)])
        return scores if per_step else scores[-1:]

    def adapted_trajectories(self, batch, steps: int) -> list:
        """The ``test_trajectories`` trajectories per task of the policy after 0..``steps``
        policy-gradient steps, each step taken on the trajectories before it. The step size is
        ``inner_lr`` for the first step and ``inner_lr * test_lr_decay`` after it (the paper
        halves it). The trajectories are of the environment's type, whatever the policy's."""
        config = self.config
        params, per_task = {k: v.detach() for k, v in self.policy.named_parameters()}, False
        generators = batch.generators(next(iter(params.values())).device)
        out = []
        for step in range(steps + 1):
            sampled = self._rollout(batch, params, per_task, config.test_trajectories, generators)
            out.append(sampled)
            if step < steps:
                lr = config.inner_lr * (config.test_lr_decay if step else 1.0)
                params = self.adapt(params, per_task, sampled, self._advantages(sampled), lr)
                params, per_task = {k: v.detach() for k, v in params.items()}, True
        return out
