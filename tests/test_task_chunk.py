"""Bounded memory: a meta-batch in chunks of tasks (``TrainConfig.task_chunk``) has the whole
batch's meta-gradient, and ``task_chunk="auto"`` chooses the chunk from a memory budget."""

from __future__ import annotations

import pytest
import torch

from batches import image_batch
from metalearn import memory_budget as memory
from metalearn.algorithms import METHODS
from metalearn.api import resolve_config
from metalearn.errors import ConfigError, OptionError
from metalearn.models import Conv4
from metalearn.runs import RunDir
from metalearn.training import build_trainer, meta_gradient

DETERMINISTIC = [
    ("maml", {"inner_lr": 0.1, "inner_steps": 2}),
    ("maml", {"inner_lr": 0.1, "inner_steps": 2, "first_order": True}),
    ("maml", {"inner_lr": 0.1, "inner_steps": 2, "learn_inner_lr": True, "multi_step_loss": True}),
    ("protonet", {}),
    ("matchingnet", {"full_context_embeddings": True, "processing_steps": 2}),
]


def gradient(learner, batch, chunk):
    learner.zero_grad(set_to_none=True)
    loss, metrics = meta_gradient(learner, batch, chunk)
    return loss, metrics, [p.grad.clone() for p in learner.parameters()]


@pytest.mark.parametrize("method,options", DETERMINISTIC,
                         ids=["maml", "maml-first-order", "maml++", "protonet", "matchingnet-fce"])
def test_chunks_have_the_whole_batch_meta_gradient_in_float64(method, options):
    torch.manual_seed(0)
    ways = 3
    embedding = method not in ("maml",)
    model = Conv4(1, None if embedding else ways, hidden=4, pooling="max").double()
    extra = {"embedding_dim": 4} if method == "matchingnet" else {}  # 4 channels of 1 x 1 after four poolings
    learner = METHODS[method](model, METHODS[method].Config(**options), **extra).double()
    batch = image_batch(tasks=5, ways=ways, shots=2, query=2, size=16)
    whole_loss, whole_metrics, whole = gradient(learner, batch, 0)
    for chunk in (1, 2, 3):  # 3: chunks of 3 and 2, weighted 3/5 and 2/5
        loss, metrics, chunked = gradient(learner, batch, chunk)
        torch.testing.assert_close(loss, whole_loss, rtol=1e-12, atol=0)
        # accuracy is a float32 mean of 0/1 hits: equal to float32 rounding
        torch.testing.assert_close(metrics["accuracy"], whole_metrics["accuracy"], rtol=1e-6, atol=0)
        for a, b in zip(chunked, whole):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert any(g.abs().max() > 1e-3 for g in whole)  # a real gradient, not zeros compared with zeros


def test_reptile_with_one_draw_for_all_tasks_chunks_to_the_same_direction():
    """Reptile's direction theta - mean(phi) is linear in the tasks: with the mini-batch order
    drawn once for all tasks (the same seed before each call) the chunks give the whole batch's."""
    torch.manual_seed(0)
    learner = METHODS["reptile"](Conv4(1, 3, hidden=4, pooling="max").double(),
                                 METHODS["reptile"].Config(inner_steps=2, inner_batch_size=3)).double()
    batch = image_batch(tasks=4, ways=3, shots=2, query=1, size=16)
    # one task per chunk, each drawing its order from the same seed as the whole batch's first task
    learner.minibatches = lambda x, y, steps, size, generator=None, one_order=False: \
        type(learner).minibatches(x, y, steps, size, torch.Generator().manual_seed(7), one_order=True)
    _, _, whole = gradient(learner, batch, 0)
    _, _, chunked = gradient(learner, batch, 1)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_reptile_with_carried_adam_state_refuses_chunks(tmp_path):
    config = resolve_config("reptile", task={"dataset": "sinusoid"}, method_config={"inner_optimizer": "adam", "inner_adam_state": "carried"},
                            train={"steps": 1, "meta_batch_size": 4, "task_chunk": 2})
    with pytest.raises(ConfigError, match="task_chunk cannot split the meta-batch of Reptile .*carried"):
        build_trainer(config, tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        build_trainer(resolve_config("reptile", task={"dataset": "sinusoid"},
                                     method_config={"inner_optimizer": "adam", "inner_adam_state": "carried"},
                                     train={"steps": 1, "task_chunk": "auto"}), tmp_path / "run")
    assert err.value.with_flags().startswith("--task-chunk cannot split")


def test_the_memory_module_refuses_chunks(tmp_path):
    """Its tasks share one memory per meta-batch: a chunk of them has another meta-gradient."""
    from batches import image_batch as batch_of
    from metalearn.tasks.batch import Problem

    Memory = METHODS["memory"]
    learner = Memory.build(Memory.Config(model="conv4-embedding", memory_size=64, key_dim=8, choose_k=4,
                                         dropout=0.0, age_noise=0.0), Problem((1, 16, 16), 3, True)).double()
    torch.manual_seed(0)
    batch = batch_of(tasks=4, ways=3, shots=2, query=2, size=16)
    whole_loss, _, whole = gradient(learner, batch, 0)
    chunked_loss, _, chunked = gradient(learner, batch, 1)  # what a chunk of one task would compute
    assert abs(float(whole_loss - chunked_loss)) > 1e-3
    assert "shared memory" in learner.chunking_refused()
    for chunk in (2, "auto"):
        config = resolve_config("memory", method_config={"model": "conv4-embedding", "memory_size": 64, "choose_k": 8},
                                train={"steps": 1, "meta_batch_size": 4, "task_chunk": chunk})
        with pytest.raises(ConfigError, match="task_chunk cannot split the meta-batch of the Memory Module"):
            build_trainer(config, tmp_path / "run")


@pytest.mark.parametrize("value,message", [("two", "or auto, got 'two'"), (-1, ">= 0"), (True, "must be str or int, got True")])
def test_bad_task_chunks_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("maml", task={"dataset": "sinusoid"}, train={"task_chunk": value})
    with pytest.raises(ConfigError, match=r"memory_budget must be a fraction in \(0, 1\]"):
        resolve_config("maml", task={"dataset": "sinusoid"}, train={"memory_budget": 1.5})
    # the command line gives text: a number becomes an int, so config.json holds 3, not "3"
    assert resolve_config("maml", task={"dataset": "sinusoid"}, train={"task_chunk": "3"}).train.task_chunk == 3


def sinusoid_run(steps, **train):
    return resolve_config("maml", task={"dataset": "sinusoid", "shots": 5},
                          method_config={"test_inner_steps": 1},
                          train={"steps": steps, "meta_batch_size": 5, "log_every": 1, "val_every": 0,
                                 "checkpoint_every": 2, "eval_episodes": 5, **train})


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.learner.state_dict().items()}


def test_a_chunked_run_trains_as_the_whole_batch_and_resumes_exactly(tmp_path):
    whole = build_trainer(sinusoid_run(6), tmp_path / "whole")
    whole.fit(progress=False)
    chunked = build_trainer(sinusoid_run(6, task_chunk=2), tmp_path / "chunked")
    chunked.fit(progress=False)
    for name, value in weights(whole).items():
        torch.testing.assert_close(weights(chunked)[name], value, rtol=0, atol=1e-6, msg=name)
    logged = [r for r in RunDir(tmp_path / "chunked").read_metrics() if "loss" in r]
    reference = [r for r in RunDir(tmp_path / "whole").read_metrics() if "loss" in r]
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in reference], rel=1e-5)

    build_trainer(sinusoid_run(3, task_chunk=2), tmp_path / "split").fit(progress=False)
    resumed = build_trainer(sinusoid_run(6, task_chunk=2), tmp_path / "split", resume=True)
    resumed.fit(progress=False)
    for name, value in weights(chunked).items():
        assert torch.equal(weights(resumed)[name], value), name


def test_auto_chooses_chunks_that_fit_the_budget(tmp_path, monkeypatch):
    """A budget below one task's measured step forces chunks of one task; a large one keeps the
    whole batch; both train the same weights to float rounding."""
    measured = []
    real_peak = memory.peak_memory_of

    def recording_peak(call, device):
        measured.append(real_peak(call, device))
        return measured[-1]

    monkeypatch.setattr("metalearn.training.peak_memory_of", recording_peak)
    monkeypatch.setattr("metalearn.training.available_memory", lambda device: 1)
    tight = build_trainer(sinusoid_run(3, task_chunk="auto"), tmp_path / "tight")
    tight.fit(progress=False)
    assert tight.task_chunk == 1 and measured[0] > 0

    monkeypatch.setattr("metalearn.training.available_memory", lambda device: 2**40)
    timed = []

    def whole_batch_fastest(call, device):  # seconds of a chunk: 1 s a task, the whole batch 0.5 s a task
        before = len(calls)
        call()
        tasks = calls[before]
        timed.append(tasks)
        return tasks * (0.5 if tasks == 5 else 1.0)

    calls = []
    real_meta_loss = type(tight.learner).meta_loss
    monkeypatch.setattr(type(tight.learner), "meta_loss",
                        lambda self, batch: (calls.append(batch.num_tasks), real_meta_loss(self, batch))[1])
    monkeypatch.setattr("metalearn.training.seconds_of", whole_batch_fastest)
    roomy = build_trainer(sinusoid_run(3, task_chunk="auto"), tmp_path / "roomy")
    roomy.fit(progress=False)
    assert roomy.task_chunk == 5 and timed == [1, 2, 4, 5]  # every size that fits was timed
    whole = build_trainer(sinusoid_run(3), tmp_path / "whole")
    whole.fit(progress=False)
    for name, value in weights(whole).items():
        assert torch.equal(weights(roomy)[name], value), name  # the probe leaves no trace
        torch.testing.assert_close(weights(tight)[name], value, rtol=0, atol=1e-6, msg=name)


def test_auto_takes_the_fastest_chunk_that_fits_and_stops_probing_when_it_slows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("metalearn.training.available_memory", lambda device: 2**40)
    per_task = {1: 1.0, 2: 0.9, 4: 1.5, 5: 0.1}  # 4 is a quarter slower than 2: 5 is never timed
    timed = []
    calls = []

    def scripted(call, device):
        before = len(calls)
        call()
        timed.append(calls[before])
        return calls[before] * per_task[calls[before]]

    from metalearn.algorithms.maml import MAML
    real_meta_loss = MAML.meta_loss
    monkeypatch.setattr(MAML, "meta_loss", lambda self, batch: (calls.append(batch.num_tasks),
                                                                 real_meta_loss(self, batch))[1])
    monkeypatch.setattr("metalearn.training.seconds_of", scripted)
    trainer = build_trainer(sinusoid_run(2, task_chunk="auto"), tmp_path / "run")
    trainer.fit(progress=False)
    assert trainer.task_chunk == 2 and timed == [1, 2, 4]
    # the choice is printed without a progress bar too (a long run's log keeps it)
    assert "--task-chunk auto at step 0: 2 of 5 tasks at a time" in capsys.readouterr().out
    whole = build_trainer(sinusoid_run(2), tmp_path / "whole")
    whole.fit(progress=False)
    for name, value in weights(whole).items():
        torch.testing.assert_close(weights(trainer)[name], value, rtol=0, atol=1e-6, msg=name)


def test_auto_names_the_chunk_that_repeats_a_run_of_a_method_that_draws(tmp_path, monkeypatch, capsys):
    """PLATIPUS draws its noise chunk by chunk: a timed choice is not always the same, so the log
    names the number that repeats the run; MAML draws nothing in a step and is not told so."""
    monkeypatch.setattr("metalearn.training.available_memory", lambda device: 2**40)
    monkeypatch.setattr("metalearn.training.fastest_chunk", lambda seconds: 2)
    build_trainer(sinusoid_run(1, task_chunk="auto"), tmp_path / "maml").fit(progress=False)
    out = capsys.readouterr().out
    assert "--task-chunk auto at step 0: 2 of 5 tasks at a time" in out and "draws random numbers" not in out, out
    config = resolve_config("platipus", task={"dataset": "sinusoid", "shots": 5},
                            train={"steps": 1, "meta_batch_size": 5, "log_every": 1, "val_every": 0,
                                   "eval_episodes": 5, "task_chunk": "auto"})
    build_trainer(config, tmp_path / "platipus").fit(progress=False)
    out = capsys.readouterr().out
    assert "; platipus draws random numbers in a step, chunk by chunk: --task-chunk 2 repeats this run exactly" in out


def test_the_fastest_chunk_and_the_candidates():
    assert memory.chunk_candidates(16, 16) == [1, 2, 4, 8, 16]
    assert memory.chunk_candidates(16, 6) == [1, 2, 4, 6]
    assert memory.chunk_candidates(16, 1) == [1] and memory.chunk_candidates(3, 8) == [1, 2, 3]
    assert memory.fastest_chunk({1: 1.0, 2: 0.8, 4: 0.9, 16: 2.0}) == 2
    assert memory.fastest_chunk({1: 1.0, 2: 0.99, 16: 1.03}) == 16  # within 5% of the fastest: the larger
    assert memory.fastest_chunk({1: 1.0, 16: 1.06}) == 1
    with pytest.raises(ValueError):
        memory.fastest_chunk({})


def test_largest_chunk_fits_the_budget_and_evens_out_the_chunks():
    assert memory.largest_chunk(16, per_task=100, budget=600) == 6  # 6 + 5 + 5: at most 6 (600 bytes)
    assert memory.chunk_sizes(16, 6) == [6, 6, 4]
    assert memory.largest_chunk(16, per_task=100, budget=10**6) == 16
    assert memory.largest_chunk(16, per_task=100, budget=50) == 1  # even one task does not fit: one at a time
    assert memory.largest_chunk(16, per_task=100, budget=800) == 8  # 8 + 8
    assert memory.chunk_sizes(5, 0) == [5] and memory.chunk_sizes(5, 7) == [5]


def test_peak_memory_of_a_call_is_measured_on_the_cpu():
    def allocate():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, then freed
        del x

    peak = memory.peak_memory_of(allocate, torch.device("cpu"))
    assert 60 * 2**20 < peak < 90 * 2**20
    assert memory.available_memory(torch.device("cpu")) > 0


def test_the_run_s_memory_budget_bounds_its_validation_and_its_test(tmp_path, monkeypatch):
    """``memory_budget`` without ``task_chunk="auto"`` still applies: it is the share of the
    memory that one scoring call of validation, and of the test after training, may use."""
    import metalearn.evaluation as evaluation

    budgets = []

    def recorded(score, batch, device, budget):
        budgets.append(budget)
        return None
    monkeypatch.setattr(evaluation, "tasks_per_call", recorded)
    from metalearn.api import evaluate_run, train

    run_dir = tmp_path / "run"
    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 2, "meta_batch_size": 2, "val_every": 1, "val_episodes": 4,
                                   "eval_episodes": 4, "memory_budget": 0.25})
    train(config, run_dir, progress=False, announce=lambda _: None)
    assert budgets == [0.25] * 3  # two validations and the test, at the run's budget
    budgets.clear()
    evaluate_run(run_dir, episodes=4, progress=False)  # metalearn eval: the run's budget
    assert budgets == [0.25]



def test_the_memory_limit_of_the_process_s_control_groups_binds(tmp_path):
    """A SLURM job or systemd slice limits a group below the root, and cgroup v1 keeps the memory
    controller apart: the limits of the process's own group and of every group above it count,
    under v2, v1 and the hybrid layout (v2 under unified/); v1's "no limit" never binds; inactive
    file pages (reclaimable page cache) are not counted as used."""
    def group(folder, limit, used, names=("memory.max", "memory.current")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / names[0]).write_text(f"{limit}\n")
        (folder / names[1]).write_text(f"{used}\n")

    gib = 2**30
    v2 = tmp_path / "v2"
    group(v2 / "job.slice", 2 * gib, 2 * gib - 100)  # the parent's limit is nearly used up
    group(v2 / "job.slice" / "step_0", 8 * gib, gib)
    (v2 / "cgroup.controllers").write_text("memory\n")
    proc = tmp_path / "cgroup-v2"
    proc.write_text("0::/job.slice/step_0\n")
    assert memory._cgroup_limits(str(proc), str(v2)) == [(8 * gib, gib), (2 * gib, 2 * gib - 100)]
    group(v2, "max", 5)  # the root: no limit
    assert len(memory._cgroup_limits(str(proc), str(v2))) == 2

    v1 = tmp_path / "v1"
    names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    group(v1 / "memory", 9223372036854771712, 3 * gib, names)  # v1's "no limit"
    group(v1 / "memory" / "batch" / "job7", 4 * gib, 3 * gib, names)
    (v1 / "unified").mkdir()
    proc.write_text("12:cpu,cpuacct:/batch/job7\n4:memory:/batch/job7\n0::/batch/job7\n")
    assert memory._cgroup_limits(str(proc), str(v1)) == [(4 * gib, 3 * gib), (9223372036854771712, 3 * gib)]
    assert memory._cgroup_limits(str(tmp_path / "none"), str(v1)) == []
    # page cache the kernel reclaims first (a dataset copied to local disk) is not counted as used
    (v1 / "memory" / "batch" / "job7" / "memory.stat").write_text(
        f"cache {2 * gib}\ntotal_inactive_file {2 * gib}\ntotal_active_file 5\n")
    assert memory._cgroup_limits(str(proc), str(v1))[0] == (4 * gib, gib)
    (v2 / "job.slice" / "memory.stat").write_text(f"anon 5\ninactive_file {gib}\nactive_file 7\n")
    proc.write_text("0::/job.slice/step_0\n")
    assert memory._cgroup_limits(str(proc), str(v2)) == [(8 * gib, gib), (2 * gib, gib - 100)]


def test_an_address_space_limit_bounds_the_memory_available(monkeypatch):
    """Under ``ulimit -v`` (RLIMIT_AS, which some schedulers set per job) an allocation fails
    once the process's address space (VmSize) reaches the limit, whatever the machine has free:
    --task-chunk auto and the array checks count what the limit leaves."""
    import resource

    size = memory._status_bytes("VmSize")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (size + 10**8, resource.RLIM_INFINITY)
                        if which == resource.RLIMIT_AS else (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert 0 < memory.available_memory(torch.device("cpu")) <= 10**8 + 2**26  # what VmSize grew meanwhile aside
    with pytest.raises(OptionError, match=r"^the array takes 0\.2 GB of memory, more than the 0\.1 GB available; "):
        memory.check_array_fits(2 * 10**8, "the array", "give fewer")
