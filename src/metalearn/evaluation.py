"""Evaluation: many test episodes -> mean accuracy (or MSE) with a 95% confidence interval,
after every adaptation step."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from metalearn.algorithms.base import (MetaLearner, device_mismatch, device_of, drawing_from, evaluating,
                                       prediction_scores)
from metalearn.config import FRACTION, MAX_EPISODES, TrainConfig, budget_problem
from metalearn.distributed import World
from metalearn.errors import (MetalearnError, MetalearnWarning, OptionError, OptionWarning, caller_level,
                              check_count, keyword_only_after)
from metalearn.runtime import DroppingStream, cuda_devices, float32_default, own_random_state
from metalearn.tasks import TaskSource, require_sampled_batch, require_task_source
from metalearn.tasks.batch import TaskBatch, data_fix


def episode_scores(learner: MetaLearner, batch, per_step: bool = True) -> torch.Tensor:
    """Per-step, per-task score (:meth:`MetaLearner.episode_scores`): (steps + 1, tasks), or
    (1, tasks) for the final predictions alone (``per_step`` False). A learner of your own
    that only predicts (any object with ``predict`` / ``predict_per_step``) is scored by its
    predictions' accuracy or MSE."""
    scores = getattr(learner, "episode_scores", None)
    if scores is None:
        return prediction_scores(learner, batch, per_step)
    return scores(batch, per_step)


EPISODE_CHUNK = 50  # episodes drawn per batch: the draws, and so the episodes, depend on it
EVAL_MEMORY_BUDGET = TrainConfig.memory_budget  # the share of the available memory, as a training step's default


def tasks_per_call(score: Callable[[Any], Any], batch, device: torch.device, budget: float) -> int | None:
    """How many of ``batch``'s tasks one call of ``score`` (a batch's scores) may take within
    ``budget`` (a fraction) of the memory available now, measured on the first task; None where
    all fit at once, or where this system cannot measure a call's memory (no
    ``/proc/self/clear_refs``, another device type): then all are scored at once.

    The measured call's scores are dropped and its random draws undone (a sampling method's
    episodes then draw what they would without it), so where the batch fits, a learner whose
    scores of a task depend on that task alone (every library method) gives the bytes it gives
    unmeasured. The measured peak includes the call's fixed costs, an overestimate per task, on
    the safe side; one task, so that the measurement itself needs no more memory than the
    smallest part it may choose. CPU processes of one machine (torchrun) share its memory. On
    the CPU the process's peak resident set (``VmHWM``) is reset by the measurement; on a GPU
    torch's peak-memory statistics."""
    from metalearn.distributed import environment_count
    from metalearn.memory_budget import available_memory, largest_chunk, peak_memory_of

    probed = 1
    try:
        allowed = int(budget * available_memory(device))
        if device.type == "cpu":
            allowed //= max(environment_count("LOCAL_WORLD_SIZE", 1), 1)
        with own_random_state([device] if device.type == "cuda" else []):
            peak = peak_memory_of(lambda: score(batch.select(slice(0, probed))), device)
    except MetalearnError:  # no /proc/self/clear_refs or /proc/meminfo, or another device type
        return None
    per_task = max(peak // probed, 1)
    if per_task * batch.num_tasks <= allowed:
        return None
    return largest_chunk(batch.num_tasks, per_task, allowed)


def scored_in_calls(score: Callable[[Any], Any], batch, per_call: int | None, dim: int = 0):
    """``score(batch)`` (a tensor, or a dict of tensors, with a task axis ``dim``), taken
    ``per_call`` tasks at a time (None: all at once) and put together."""
    from metalearn.memory_budget import chunk_sizes

    sizes = chunk_sizes(batch.num_tasks, per_call or 0)
    if len(sizes) == 1:
        return score(batch)
    parts, start = [], 0
    for size in sizes:
        parts.append(score(batch.select(slice(start, start + size))))
        start += size
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts], dim=dim) for key in parts[0]}
    return torch.cat(parts, dim=dim)


def check_seed(value: Any, name: str = "seed", most: int = 2**63 - 1) -> int:
    """A seed as Python's int (a NumPy integer too), or a one-line error for anything that is not
    a whole number from 0 to ``most``: torch's manual_seed would fail on it with a message about
    its own arguments, or take a negative one."""
    return check_count(value, name, 0, most)


@keyword_only_after(3)
def evaluate(
    learner: MetaLearner,
    source: TaskSource,
    episodes: int = 600,
    *,
    seed: int = 0,
    chunk: int = EPISODE_CHUNK,
    world: World = World(),
    progress: bool = False,
    per_step: bool = True,
    memory_budget: float | None = EVAL_MEMORY_BUDGET,
    abandon: Callable[[], bool] | None = None,
) -> dict[str, Any] | None:
    """Score ``learner`` on ``episodes`` test tasks drawn from ``seed`` (the same episodes for
    every method given the same seed), split across the ranks of ``world``. ``source``: the task
    source the episodes are drawn from, an object whose ``sample(num_tasks, generator,
    tasks=None)`` returns a :class:`~metalearn.TaskBatch` (an :class:`~metalearn.envs.MDPBatch`
    for an environment's tasks): :func:`~metalearn.build_task_source`'s, an
    :class:`~metalearn.EpisodeSampler` or a source of one's own. ``progress``: a progress bar
    over the episodes on rank 0; False (the default) draws none.

    The episodes depend on ``seed`` and ``chunk`` (episodes drawn per batch), not on the number
    of ranks: each chunk is shared out, and with more ranks than episodes in a chunk some ranks
    score none of it (a rank may score no episode at all).

    ``seed`` is the generator's seed as it is. ``evaluate_run(seed=s)`` and ``metalearn eval
    --seed s`` draw from ``s + TEST_SEED_OFFSET`` (``metalearn.training``; validation from ``s +
    VALIDATION_SEED_OFFSET``), so that test episodes never repeat training's: to score your own
    learner on a run's test episodes, pass ``seed=s + TEST_SEED_OFFSET``.

    ``per_step``: also score the predictions after every adaptation step. False scores the
    final predictions alone, the same numbers at less cost where the steps must be observed
    apart from the adaptation (a query pass after every step: Reptile's transductive
    evaluation, MAML's, PLATIPUS's; ``benchmarks/eval_final_only.py``); training's validation does so.

    ``memory_budget``: the fraction of the available memory one scoring call may use. A drawn
    chunk whose episodes would need more (many ways, large images, a large network) is scored
    in parts of as many episodes as fit (:func:`tasks_per_call`, measured once per call of
    evaluate on one episode, an extra call of ``learner``): the same scores to float rounding,
    other random draws for a sampling method's episodes (PLATIPUS), so that its scores then
    depend on the memory free. None scores each drawn chunk at once, unmeasured (a learner of
    your own whose prediction depends on a task's place in the batch needs it).

    Returns ``metric`` ("accuracy" in percent, "mse", or "return" for MDPs), ``mean``, ``ci95`` (1.96 standard
    errors over episodes), ``per_step`` means (and ``per_step_ci95``, their intervals), ``episodes``, the per-episode ``scores`` and the
    number of ``diverged`` episodes (non-finite score). One diverged episode makes the mean
    non-finite, on purpose: a score that leaves them out would flatter the method. Where some
    but not all diverged, ``mean_of_finite`` is the mean of the others. An MSE carried by a few
    far-off episodes adds ``outliers``, ``outlier_max``, ``mean_without_outliers`` and ``median``
    (see :func:`outliers`). ``evaluate_run`` and the test after ``train`` warn of both
    (:func:`warn_of_result`); this function, which training's validation calls, only counts
    them: ``warn_of_result(result)`` warns of them here too. The episodes are drawn, and scored,
    under torch's float32 default dtype (:func:`metalearn.runtime.float32_default`): the same
    episodes whatever the caller's.

    ``abandon``, where given, is called on every rank before each chunk after the first (the
    same number of times on each, so it may hold a collective); where it returns True the
    evaluation stops there and returns None. Training's validation gives up so for a stop
    signal, whose grace (torchrun's ``--shutdown_timeout``, SLURM's ``KillWait``) may be shorter
    than a validation: the step's checkpoint is saved instead, and the resumed run validates.
    """
    with float32_default(), drawing_from(source):  # drawing_from: a refusal of the batches' dtype names its remedy
        return _evaluate(learner, source, episodes, seed, chunk, world, progress, per_step, memory_budget, abandon)


def _described(learner: Any) -> str:
    """A wrong learner as the refusal names it: a class is not an instance of it."""
    if isinstance(learner, type):
        return f"the class {learner.__name__} itself (build one: {learner.__name__}(network, ...))"
    return f"{type(learner).__name__} {learner!r:.80}"


def _evaluate(learner, source, episodes, seed, chunk, world, progress, per_step, memory_budget,
              abandon=None) -> dict[str, Any] | None:
    """:func:`evaluate`, under the float32 default."""
    if isinstance(learner, type) or not any(hasattr(learner, name)
                                            for name in ("episode_scores", "predict", "predict_per_step")):
        raise MetalearnError(f"evaluate's learner is a MetaLearner (e.g. metalearn.load_trained(run_dir)[1]) or an "
                             f"object with predict, got {_described(learner)}")
    require_task_source(source, "evaluate's source")
    episodes = check_count(episodes, "episodes")
    if episodes > MAX_EPISODES:
        raise OptionError(f"{{episodes}} must be at most {MAX_EPISODES:,} (the intervals of papers use 600 to 10,000), "
                          f"got {episodes}", episodes="episodes")
    chunk = check_count(chunk, "chunk")
    seed = check_seed(seed)  # the generator's seed as it is: a run's test seeds carry TEST_SEED_OFFSET
    problem = budget_problem(memory_budget) if memory_budget is not None else None
    if problem is not None:
        raise MetalearnError(f"memory_budget is {problem}{' or None' if problem == FRACTION else ''}, "
                             f"got {memory_budget!r}")
    generator = torch.Generator().manual_seed(seed)
    device = device_of(learner)  # world.device when the API built it; any device for a learner of your own
    if device.type == "meta":  # its scores would hold no values, and copying them out fail inside torch
        raise MetalearnError("evaluate: the learner's parameters are on the meta device, which holds no values; "
                             "give it real weights first (learner.to_empty(device='cpu'), then "
                             "learner.load_state_dict(...))")
    with evaluating(learner):  # the former mode comes back also if an episode raises
        scores, metric = [], "accuracy"
        measure, per_call = memory_budget is not None, None

        def score(part):  # (steps + 1, tasks), detached: a learner that adapts without gradient
            # steps (a plain embedding) would otherwise keep each call's graph, and float() of a score warn of it
            return episode_scores(learner, part, per_step).detach()
        chunks = []  # (first episode, size) of each chunk, to put the ranks' scores back in episode order
        unclean = None  # what is wrong with the first chunk of unusable data (TaskBatch.data_problem)
        remaining = episodes
        bar = None
        if progress and world.is_main:
            from tqdm import tqdm

            bar = tqdm(total=episodes, desc="evaluating", unit="episode", leave=False,
                       file=DroppingStream(drop_when_busy=True))
        # a stochastic method (PLATIPUS) draws its samples from `seed`; the CUDA devices' states are
        # kept only where CUDA is in use (fork_rng's default starts CUDA, and warns with 2 GPUs)
        with own_random_state(cuda_devices()):
            torch.manual_seed(seed)
            while remaining > 0:
                if chunks and abandon is not None and abandon():
                    break
                size = min(chunk, remaining)
                chunks.append((episodes - remaining, size))
                share = world.share(size)
                batch = source.sample(size, generator, tasks=share)
                require_sampled_batch(batch, source, "evaluate's source")
                # where the task source drew it (the CPU): looked at on a GPU, each tensor would cost a sync
                if unclean is None and isinstance(batch, TaskBatch):
                    unclean = batch.data_problem(episodes - remaining + (share.start or 0))
                batch = batch.to(device)
                metric = batch_metric(batch)
                if share.stop > share.start:  # a chunk smaller than the number of ranks
                    try:
                        if measure and batch.num_tasks > 1:  # the chunks after the first: their size or less
                            measure, per_call = False, tasks_per_call(score, batch, device, memory_budget)
                        scores.append(scored_in_calls(score, batch, per_call, dim=1))
                    except RuntimeError as err:  # part of a learner of one's own on another device than
                        # its first parameter, where the batch went: say so, not torch's kernel's words
                        mismatch = device_mismatch(getattr(learner, "name", type(learner).__name__), err, None,
                                                   device)
                        if mismatch is None:
                            raise
                        raise mismatch from None
                remaining -= size
                if bar is not None:
                    bar.update(size)
        if bar is not None:
            bar.close()
    if remaining > 0:  # abandoned
        return None
    if unclean is not None:  # the episodes' scores are NaN for the data's sake, not the adaptation's
        warnings.warn(MetalearnWarning(f"the task source drew {unclean}: an episode whose "
                                       f"score they make non-finite counts as diverged; {data_fix(unclean)}"),
                      stacklevel=caller_level())
    # (episodes on this rank, steps + 1), in float64 so that a rank without episodes, which knows
    # neither the steps nor the learner's dtype, sends what the others do
    local = (torch.cat(scores, dim=1).T.to("cpu", torch.float64).contiguous() if scores
             else torch.zeros(0, 0, dtype=torch.float64))
    per_episode = episode_order(world, chunks, world.gather(local)).T  # (steps + 1, episodes)
    scale = 100.0 if metric == "accuracy" else 1.0
    final = per_episode[-1] * scale
    n = final.numel()
    std = float(final.std()) if n > 1 else 0.0
    finite = final[torch.isfinite(final)]
    result = {
        "metric": metric,
        "mean": float(final.mean()),
        "ci95": 1.96 * std / math.sqrt(n),
        "per_step": [float(v) for v in per_episode.mean(1) * scale],
        # the spread of one episode is undefined (torch's std warns of it): its interval is 0
        "per_step_ci95": ([1.96 * float(v) / math.sqrt(n) for v in (per_episode * scale).std(1)] if n > 1
                          else [0.0] * per_episode.shape[0]),
        "episodes": n,
        "diverged": n - finite.numel(),
        "seed": seed,
        "scores": [float(v) for v in final],
    }
    if 0 < finite.numel() < n:  # the mean above is NaN or inf; say what the rest scored
        result["mean_of_finite"] = float(finite.mean())
    result.update(outliers(finite, metric))
    return result


OUTLIER_FACTOR = 100.0  # an episode's MSE this many times the median episode's is an outlier


def outliers(finite: torch.Tensor, metric: str) -> dict[str, Any]:
    """For an MSE: the episodes (at most a tenth of them) whose finite score exceeds
    ``OUTLIER_FACTOR`` times the median episode's (``median``: the lower middle value of an
    even count, as ``torch.median``) and that carry the mean of the finite scores (without them
    it is less than half), as ``outliers`` (their count), ``outlier_max`` and
    ``mean_without_outliers``; ``{}`` where there are none. One such episode can carry the mean
    (an adaptation gone far off without overflowing: MAML's ten test steps on one sinusoid of
    600 took the mean from 0.30 to 1.76), which the mean and its interval do not show. They
    stay in the mean, as diverged episodes do; this only says so."""
    if metric != "mse" or finite.numel() < 3:
        return {}
    median = float(finite.median())
    far = finite > OUTLIER_FACTOR * median
    count = int(far.sum())
    if median <= 0 or count == 0 or count > finite.numel() // 10:
        return {}
    rest = float(finite[~far].mean())
    if rest >= 0.5 * float(finite.mean()):  # far off, but too small to move the mean much
        return {}
    return {"outliers": count, "outlier_max": float(finite[far].max()), "mean_without_outliers": rest,
            "median": median}


def batch_metric(batch) -> str:
    """What a batch's episodes are scored by: "accuracy", "mse", or the batch's own ``metric``
    (an MDP batch's "return")."""
    own = getattr(batch, "metric", None)
    if own is not None:
        return own
    return "accuracy" if batch.is_classification else "mse"


HIGHER_IS_BETTER = {"accuracy": True, "return": True, "mse": False}


class Ensemble(MetaLearner):
    """The average prediction of several trained learners of one run on the same episodes: logits
    (or regression outputs) averaged after each adaptation step, as MAML++'s code averages the
    logits of its best validation checkpoints (Antoniou et al. 2019, section 5)."""

    name = "ensemble"

    def __init__(self, members: list[MetaLearner]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        return torch.stack([member.predict(batch) for member in self.members]).mean(0)

    def predict_per_step(self, batch: TaskBatch) -> torch.Tensor:
        return torch.stack([member.predict_per_step(batch) for member in self.members]).mean(0)


def episode_order(world: World, chunks: list[tuple[int, int]], gathered: torch.Tensor) -> torch.Tensor:
    """The ranks' gathered rows (rank 0's episodes of every chunk, then rank 1's, ...) in
    episode order, as one process would have scored them."""
    if not world.distributed:
        return gathered
    order = [start + i for rank in range(world.size) for start, size in chunks
             for i in range(*World(rank, world.size).share(size).indices(size))]
    restored = torch.empty_like(gathered)
    restored[torch.tensor(order)] = gathered
    return restored


def _figure(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` places, or in powers of ten where that would print more
    than a dozen digits (a diverged regression's mean: 7.5e+30, not 31 digits)."""
    return f"{value:.{decimals}f}" if abs(value) < 1e9 else f"{value:.4g}"


def _has_option(method: str | None, option: str) -> bool:
    """Whether the registered ``method`` has ``option`` (advice names only options it takes)."""
    from metalearn.algorithms import METHODS

    return method in METHODS and any(field.name == option for field in dataclasses.fields(METHODS[method].Config))


def format_result(result: dict[str, Any]) -> str:
    """The lines ``metalearn eval`` prints for an evaluation's ``result``: the score, and its
    scores after each adaptation step. What the score hides (diverged episodes, outlying tasks)
    is not among them: the evaluation that made the result warns of it (:func:`warn_of_result`),
    and the command line shows those warnings as it shows every other."""
    if result["metric"] == "accuracy":
        head = f"accuracy {result['mean']:.2f}% +/- {result['ci95']:.2f}% (95% CI, {result['episodes']} episodes)"
        steps = " ".join(f"{v:.1f}" for v in result["per_step"])
    elif result["metric"] == "return":
        head = f"average return {result['mean']:.2f} +/- {result['ci95']:.2f} (95% CI, {result['episodes']} tasks)"
        steps = " ".join(f"{v:.2f}" for v in result["per_step"])
    else:
        head = (f"MSE {_figure(result['mean'], 4)} +/- {_figure(result['ci95'], 4)} (95% CI, {result['episodes']} "
                "tasks)")
        steps = " ".join(_figure(v, 3) for v in result["per_step"])
    text = head
    if len(result["per_step"]) > 1:  # one entry: no per-step scores (no inner loop, or not recorded)
        kind = "policy-gradient" if result["metric"] == "return" else "adaptation"
        text += f"\nafter 0..{len(result['per_step']) - 1} {kind} steps: {steps}"
    if "lower_bound" in result:  # a generative method's bound on the sets of the part scored
        bound = result["lower_bound"]
        part = {"val": "validation", "train": "training"}.get(result.get("part", "test"), "test")
        text += (f"\n{part} lower bound {bound['bound_nats_per_image']:.2f} nats per image ({bound['bound_sets']} sets of "
                 f"{bound['bound_episodes']} episodes)")
    return text


def fewer_steps_advice(method: str | None) -> tuple[str, dict[str, tuple[str, str]]]:
    """The advice for diverged episodes, as an :class:`~metalearn.errors.Options` template's end and its
    fields: fewer test-time steps, with ``test_inner_steps`` named where the registered ``method`` has it."""
    from metalearn.checkpoints import override

    if not _has_option(method, "test_inner_steps"):
        return "; try fewer test-time steps", {}
    return "; try fewer test-time steps, e.g. {steps}", {"steps": override("test_inner_steps", 1)}


def result_warnings(result: dict[str, Any]) -> list[OptionWarning]:
    """What an evaluation's ``result`` warns of, one warning each: its diverged episodes (the
    mean is then not finite; how many, what the others score, and the advice of fewer test-time
    steps, naming ``test_inner_steps`` for a ``method`` that has it) and its outlying tasks (an
    MSE carried by a few far-off episodes, :func:`outliers`); none for a clean result. Each
    reads ``str()`` as Python spells its advice (``overrides={...}``), ``with_flags()`` as the
    command line does (``--set ...``)."""
    found = []
    total = result["episodes"]
    if result.get("diverged"):
        text = f"{result['diverged']} of {total} episodes diverged (non-finite score)"
        if "mean_of_finite" in result:
            unit = "%" if result["metric"] == "accuracy" else ""
            text += (f"; the other {total - result['diverged']} score "
                     f"{_figure(result['mean_of_finite'], 2 if unit else 4)}{unit} on average")
        advice, steps = fewer_steps_advice(result.get("method"))
        found.append(OptionWarning(text + advice, **steps))
    if result.get("outliers"):
        count, rest = result["outliers"], total - result.get("diverged", 0) - result["outliers"]
        mean = "the mean of the finite scores" if result.get("diverged") else "the mean"
        found.append(OptionWarning(
            f"{count} of {total} tasks score{'s' if count == 1 else ''} an MSE over {OUTLIER_FACTOR:g} times the "
            f"median task's ({result['median']:.4g}), up to {result['outlier_max']:.4g}: {mean} rests on "
            f"{'it' if count == 1 else 'them'}; the other {rest} score {_figure(result['mean_without_outliers'], 4)} "
            "on average (per-task scores: {scores})",
            scores=("the result's `scores`, also in the evaluation file", "`scores` in the evaluation file")))
    return found


def warn_of_result(result: dict[str, Any]) -> None:
    """Warn of :func:`result_warnings` (a :class:`MetalearnWarning` each, at the user's call):
    ``evaluate_run`` and the test after ``train`` do, once per evaluation, on the rank that
    writes its file. :func:`evaluate` itself does not, as training's validation calls it at
    every validation; its result holds the same counts."""
    for warning in result_warnings(result):
        warnings.warn(warning, stacklevel=caller_level())
