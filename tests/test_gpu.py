"""On a CUDA GPU: every method computes what it computes on the CPU, the command line trains,
evaluates and resumes there (across devices too), and torchrun runs on NCCL.

Skipped where torch sees no GPU, so CI (CPU only) skips them all. ``METALEARN_TEST_DEVICE``
(default ``cuda``) names the device; ``cpu`` runs the same checks CPU against CPU, a dry run
of the tests themselves.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from batches import image_batch
from checkpoints import assert_same_weights, weights
from metalearn.algorithms import METHODS, build_learner
from metalearn.api import resolve_config
from metalearn.runs import RunDir
from metalearn.tasks import problem_of

DEVICE = os.environ.get("METALEARN_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (set METALEARN_TEST_DEVICE=cpu for a dry run)")

# every method of images (a method of MDPs, maml-rl, takes an environment, not these tasks: none
# is checked on the GPU here), with the options it needs here where its paper's defaults will not do
IMAGE_METHODS = [name for name, cls in METHODS.items() if not cls.reinforcement]
OPTIONS = {"memory": {"memory_size": 64, "choose_k": 8, "dropout": 0.0}}  # dropout: the GPU draws other masks
# (method, options): every method, and the options that change what runs
VARIANTS = [(method, OPTIONS.get(method, {})) for method in IMAGE_METHODS] + [
    ("maml", {"first_order": True}),
    ("maml", {"learn_inner_lr": True, "model": "conv4-maxpool"}),
    ("matchingnet", {"full_context_embeddings": True}),
    ("reptile", {"transductive": False}),
    ("memory", {"memory_size": 64, "choose_k": 8, "model": "conv4-embedding", "dropout": 0.0}),
]


def build(method: str, options: dict, ways: int = 3):
    try:
        config = resolve_config(method, {"dataset": "omniglot", "ways": ways, "shots": 2, "query": 2},
                                method_config=options)
        torch.manual_seed(0)
        return build_learner(method, config.method_config, problem_of(config.task)).double()
    except Exception as err:  # a new method that needs options of its own here
        pytest.fail(f"{method} with options {options} cannot be built for {ways}-way 2-shot Omniglot "
                    f"({type(err).__name__}: {err}); give it options in OPTIONS of {__file__}")


@pytest.mark.parametrize("method,options", VARIANTS, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "defaults")
def test_each_method_computes_the_same_meta_gradient_and_predictions_on_the_gpu(method, options):
    """float64: the meta-loss, every meta-gradient and the per-step predictions on the GPU
    equal the CPU's to rounding. Model noise (PLATIPUS) and mini-batch orders (Reptile) come
    from the CPU generator whatever the device, so one seed gives the same numbers."""
    on_cpu = build(method, options)
    on_gpu = copy.deepcopy(on_cpu).to(DEVICE)
    batch = image_batch(tasks=3, ways=3, shots=2, query=2, size=28)
    gpu_batch = batch.to(torch.device(DEVICE))

    results = {}
    for name, learner, tasks, device in (("cpu", on_cpu, batch, "cpu"), ("gpu", on_gpu, gpu_batch, DEVICE)):
        torch.manual_seed(1)
        loss, metrics = learner.meta_loss(tasks)
        loss.backward()
        torch.manual_seed(2)
        predictions = learner.predict_per_step(tasks)
        grads = {n: p.grad.detach().cpu() for n, p in learner.named_parameters() if p.grad is not None}
        results[name] = loss.detach().cpu(), grads, predictions.cpu(), {k: v.cpu() for k, v in metrics.items()}
        assert all(p.device.type == torch.device(device).type for p in learner.parameters())

    (loss_c, grads_c, pred_c, metrics_c), (loss_g, grads_g, pred_g, metrics_g) = results["cpu"], results["gpu"]
    close = dict(rtol=1e-7, atol=1e-9)  # float64 rounding, amplified by batch norm over few images
    torch.testing.assert_close(loss_g, loss_c, **close)
    assert grads_c.keys() == grads_g.keys() and len(grads_c) > 0
    for name in grads_c:
        torch.testing.assert_close(grads_g[name], grads_c[name], **close, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(pred_g, pred_c, **close)
    assert metrics_c.keys() == metrics_g.keys()
    for key in metrics_c:
        torch.testing.assert_close(metrics_g[key], metrics_c[key], **close)


# -- the command line on the GPU ----------------------------------------------------------------

def run(args, check=True, timeout=600, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    done = subprocess.run([sys.executable, "-m", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def omniglot_args(method, data_dir, *extra):
    return ["metalearn", "train", method, "--dataset", "omniglot", "--ways", 5, "--shots", 1,
            "--meta-batch-size", 2, "--val-every", 0, "--no-progress", "--data-dir", data_dir, *extra]


# command-line options a method needs in the runs below, where its paper's defaults will not do
CLI_OPTIONS: dict[str, list] = {}


@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_train_and_evaluate_on_the_gpu_then_evaluate_the_checkpoint_on_the_cpu(method, omniglot_data_dir,
                                                                                tmp_path):
    run_dir = tmp_path / "run"
    done = run(omniglot_args(method, omniglot_data_dir, "--steps", 3, "--eval-episodes", 40, "--device", DEVICE,
                             "--run-dir", run_dir, *CLI_OPTIONS.get(method, [])), check=False)
    assert done.returncode == 0, (f"{method} did not train on 5-way 1-shot Omniglot (options of its own it needs "
                                  f"here go in CLI_OPTIONS of {__file__}):\n{done.stderr[-4000:]}")
    assert "accuracy" in done.stdout
    on_gpu = json.loads((run_dir / "eval.json").read_text())
    assert on_gpu["episodes"] == 40 and 0 <= on_gpu["mean"] <= 100
    run(["metalearn", "eval", run_dir, "--episodes", 40, "--device", "cpu", "--no-progress",
         "--data-dir", omniglot_data_dir])
    on_cpu = json.loads((run_dir / "eval.json").read_text())
    # the same episodes and weights; float32 kernels differ, so a near-tie may flip a query
    differing = sum(abs(a - b) > 1e-3 for a, b in zip(on_gpu["scores"], on_cpu["scores"]))
    assert differing <= 2, (on_gpu["scores"], on_cpu["scores"])
    assert on_gpu["mean"] == pytest.approx(on_cpu["mean"], abs=1.0)


@pytest.mark.parametrize("method", ["maml", "reptile"])
def test_resume_on_the_gpu_and_across_devices(method, omniglot_data_dir, tmp_path):
    """4 steps straight on the GPU; 2 + resume + 2 on the GPU: equal (deterministic kernels);
    2 on the GPU + 2 resumed on the CPU: the last 2 steps move the weights as the GPU's did, up
    to the CPU's other float32 rounding. A constant meta step size, so that the run's length may
    grow on resume."""
    common = ["--meta-optimizer", "sgd", "--meta-lr", 0.5, "--lr-anneal", "none", "--checkpoint-every", 1,
              "--no-eval"]
    straight, resumed, moved = tmp_path / "straight", tmp_path / "resumed", tmp_path / "moved"
    run(omniglot_args(method, omniglot_data_dir, *common, "--steps", 4, "--device", DEVICE,
                      "--run-dir", straight))
    halfway = {}
    for run_dir, second_device in ((resumed, DEVICE), (moved, "cpu")):
        run(omniglot_args(method, omniglot_data_dir, *common, "--steps", 2, "--device", DEVICE,
                          "--run-dir", run_dir))
        halfway[run_dir] = weights(run_dir)
        run(omniglot_args(method, omniglot_data_dir, *common, "--steps", 4, "--device", second_device,
                          "--run-dir", run_dir, "--resume"))
        assert RunDir(run_dir).read_checkpoint()["step"] == 4
    assert_same_weights(straight, resumed, atol=1e-6)
    end, moved_end = weights(straight), weights(moved)
    for name in end:
        last_steps = (end[name] - halfway[moved][name]).abs().max()
        assert (moved_end[name] - end[name]).abs().max() <= 0.05 * last_steps + 1e-6, name


# -- torchrun on NCCL ---------------------------------------------------------------------------

# A one-rank job is not a process group for metalearn (it runs as one process), so on a
# one-GPU machine the probe joins NCCL itself and has World use its collectives all the same.
WORLD_PROBE = """
import json, sys, torch, torch.distributed as dist
from metalearn.distributed import World, init_world

class OneRankGroup(World):
    distributed = property(lambda self: True)

world = init_world("cuda")
if not dist.is_initialized():
    dist.init_process_group("nccl")
    world = OneRankGroup(dist.get_rank(), dist.get_world_size(), world.device)
total = world.sum(torch.ones((), device=world.device))
grads = [torch.full((3,), float(world.rank + 1), device=world.device)]
world.sum_in_place(grads)
gathered = world.gather(torch.arange(world.rank + 2, dtype=torch.float32, device=world.device))
line = ["probe", dist.get_backend(), world.rank, world.size, world.device, float(total), float(grads[0][0]),
        gathered.device, gathered.tolist()]
with open(sys.argv[1] + f"/probe-{world.rank}.txt", "w") as f:
    f.write(" ".join(map(str, line)))
# evaluation's gather: float64 rows, and (with two ranks) a rank without any
rows = torch.arange(6, dtype=torch.float64, device=world.device).view(3, 2)
mine = rows if world.rank == 0 else torch.zeros(0, 0, dtype=torch.float64, device=world.device)
with open(sys.argv[1] + f"/rows-{world.rank}.txt", "w") as f:
    f.write(json.dumps(world.gather(mine).tolist()))
dist.destroy_process_group()
"""


def torchrun(nproc, args, check=True, timeout=600):
    return run(["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args], check=check,
               timeout=timeout, env_extra={"METALEARN_DIST_TIMEOUT": "60"})


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="NCCL needs a GPU")
def test_torchrun_on_the_gpu_uses_nccl_and_equals_one_process(omniglot_data_dir, tmp_path):
    """World's collectives on NCCL, and a MAML run under torchrun equal to one process: two
    ranks where two GPUs are visible; on one GPU a one-rank job (which runs as one process)."""
    ranks = min(torch.cuda.device_count(), 2)
    probe = tmp_path / "probe.py"
    probe.write_text(WORLD_PROBE)
    torchrun(ranks, [probe, tmp_path])
    lines = [(tmp_path / f"probe-{r}.txt").read_text().split(maxsplit=8) for r in range(ranks)]
    assert [line[1:5] for line in lines] == [["nccl", str(r), str(ranks), f"cuda:{r}"] for r in range(ranks)]
    gathered = [float(x) for r in range(ranks) for x in range(r + 2)]  # uneven shares, in rank order
    for line in lines:
        assert float(line[5]) == ranks  # all-reduce of a scalar
        assert float(line[6]) == ranks * (ranks + 1) / 2  # the flattened gradient all-reduce
        assert line[7] == "cpu" and json.loads(line[8]) == gathered
    for r in range(ranks):
        assert json.loads((tmp_path / f"rows-{r}.txt").read_text()) == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]

    common = ["--meta-optimizer", "sgd", "--meta-lr", 0.5, "--steps", 3, "--no-eval", "--device", "cuda"]
    run(omniglot_args("maml", omniglot_data_dir, *common, "--run-dir", tmp_path / "single"))
    torchrun(ranks, ["-m", "metalearn", "train", *omniglot_args("maml", omniglot_data_dir, *common)[2:],
                     "--run-dir", tmp_path / "ranks"])
    assert_same_weights(tmp_path / "single", tmp_path / "ranks", atol=1e-5)


@pytest.mark.skipif(not DEVICE.startswith("cuda") or torch.cuda.device_count() != 1,
                    reason="what two ranks on a one-GPU machine are told")
def test_more_ranks_than_gpus_fail_with_a_clear_message(omniglot_data_dir, tmp_path):
    done = torchrun(2, ["-m", "metalearn", "train", *omniglot_args("maml", omniglot_data_dir, "--steps", 1,
                                                              "--device", "cuda")[2:],
                        "--run-dir", tmp_path / "run"], check=False, timeout=300)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "only 1 GPU(s) visible" in output
    assert "metalearn/distributed.py" not in output  # a message, not a traceback from inside metalearn


def test_evaluate_and_trainer_follow_the_learners_device(tmp_path):
    """From Python, a learner moved to the GPU is all it takes: the evaluator and a Trainer built
    by hand put every batch where the learner is (the default World is the CPU's)."""
    from metalearn import MAML, SinusoidTasks, Trainer, evaluate
    from metalearn.config import RunConfig, TaskConfig, TrainConfig
    from metalearn.models import MLP

    torch.manual_seed(0)
    learner = MAML(MLP(), MAML.Config(model="mlp", inner_lr=0.01)).to(DEVICE)
    config = RunConfig("maml", TaskConfig(dataset="sinusoid", split="none", ways=0, shots=5, query=5),
                       {"model": "mlp", "inner_lr": 0.01}, TrainConfig(steps=2, meta_batch_size=2, val_every=0))
    Trainer(config, learner, SinusoidTasks(shots=5, query=5), None, tmp_path / "run").fit(progress=False)
    on_gpu = evaluate(learner, SinusoidTasks(shots=5, query=20), episodes=8)
    on_cpu = evaluate(copy.deepcopy(learner).cpu(), SinusoidTasks(shots=5, query=20), episodes=8)
    torch.testing.assert_close(torch.tensor(on_gpu["scores"]), torch.tensor(on_cpu["scores"]), rtol=1e-4, atol=1e-5)
