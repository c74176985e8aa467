"""N-way K-shot episodes: shapes, labels, which drawings they hold, seeding and slicing."""

from __future__ import annotations

import pytest
import torch

from batches import assert_batches_equal, gen
from metalearn.data.splits import ClassPool, omniglot_split
from metalearn.errors import MetalearnError, OptionError
from metalearn.tasks.batch import TaskBatch
from metalearn.tasks.episodes import EpisodeSampler, _distinct_classes

WAYS, SHOTS, QUERY = 5, 2, 3


@pytest.fixture(scope="module")
def raw(omniglot) -> torch.Tensor:
    return torch.from_numpy(omniglot.images)


@pytest.fixture(scope="module")
def train_pool(omniglot) -> ClassPool:
    return omniglot_split(omniglot, "vinyals", "train")


@pytest.fixture(scope="module")
def sampler(raw, train_pool) -> EpisodeSampler:
    return EpisodeSampler(raw, train_pool, WAYS, SHOTS, QUERY)


def expected_images(raw, pool, classes, draws, rotations) -> torch.Tensor:
    """(tasks, ways, shots+query, H, W) uint8 computed straight from the raw array."""
    t, w, n = draws.shape
    out = torch.empty(t, w, n, *raw.shape[2:], dtype=torch.uint8)
    for i in range(t):
        for j in range(w):
            character = int(pool.characters[classes[i, j]])
            drawings = raw[character, draws[i, j]]
            out[i, j] = torch.rot90(drawings, int(rotations[i, j]), dims=(-2, -1))
    return out


def test_shapes_and_types(sampler):
    batch = sampler.sample(4, gen(0))
    assert batch.support_x.shape == (4, WAYS * SHOTS, 1, 28, 28)
    assert batch.query_x.shape == (4, WAYS * QUERY, 1, 28, 28)
    assert batch.support_y.shape == (4, WAYS * SHOTS)
    assert batch.query_y.shape == (4, WAYS * QUERY)
    assert batch.support_x.dtype == batch.query_x.dtype == torch.float32
    assert batch.support_y.dtype == batch.query_y.dtype == torch.long
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1.0
    assert float(batch.query_x.max()) == 1.0  # strokes bright, scaled from 255
    assert batch.num_tasks == 4 and batch.ways == WAYS and batch.is_classification


def test_labels_cover_every_way_exactly_shots_times(sampler):
    batch = sampler.sample(16, gen(1))
    for t in range(16):
        assert batch.support_y[t].min() >= 0 and batch.support_y[t].max() < WAYS
        assert torch.bincount(batch.support_y[t], minlength=WAYS).tolist() == [SHOTS] * WAYS
        assert torch.bincount(batch.query_y[t], minlength=WAYS).tolist() == [QUERY] * WAYS


def test_images_are_the_drawn_drawings(sampler, raw, train_pool):
    """Image k of label j is drawing draws[j, k] of class classes[j], rotated by its class's
    rotation: the sampler's bank and flat indexing agree with the raw array."""
    classes, draws, rotations = sampler.sample_indices(6, gen(2))
    batch = sampler.sample(6, gen(2))
    assert torch.equal(rotations, train_pool.rotations[classes])  # fixed rotations in vinyals
    expected = expected_images(raw, train_pool, classes, draws, rotations).float() / 255
    for t in range(6):
        for j in range(WAYS):
            support = batch.support_x[t, batch.support_y[t] == j, 0]
            query = batch.query_x[t, batch.query_y[t] == j, 0]
            assert torch.equal(support, expected[t, j, :SHOTS])
            assert torch.equal(query, expected[t, j, SHOTS:])


def test_support_and_query_drawings_are_distinct(sampler, raw, train_pool):
    classes, draws, _ = sampler.sample_indices(200, gen(3))
    assert draws.shape == (200, WAYS, SHOTS + QUERY)
    assert draws.min() >= 0 and draws.max() < 20
    sorted_draws = draws.sort(dim=2).values
    assert (sorted_draws[..., 1:] != sorted_draws[..., :-1]).all()
    # and as images: no query image of a class repeats one of its support images (the one known
    # pair of identical drawings in the release, Braille/character01 3 and 19, aside)
    batch = sampler.sample(200, gen(3))
    for t in range(200):
        for j in range(WAYS):
            if int(train_pool.characters[classes[t, j]]) == 191:
                continue
            support = batch.support_x[t, batch.support_y[t] == j].flatten(1)
            query = batch.query_x[t, batch.query_y[t] == j].flatten(1)
            assert not (support[:, None] == query[None]).all(-1).any()


def test_classes_within_a_task_are_distinct(sampler, train_pool):
    classes, _, _ = sampler.sample_indices(2000, gen(4))
    assert classes.min() >= 0 and classes.max() < len(train_pool)
    ordered = classes.sort(dim=1).values
    assert (ordered[:, 1:] != ordered[:, :-1]).all()


def test_class_order_and_choice_are_uniform(sampler, train_pool):
    """Labels are re-drawn per episode: the class order within a task is random, and every
    class of the pool gets drawn."""
    classes, _, _ = sampler.sample_indices(6000, gen(5))
    ascending = (classes[:, 1:] > classes[:, :-1]).all(1).float().mean().item()
    assert 0.002 < ascending < 0.02  # 1/120 for a random order of 5
    where_min = torch.bincount(classes.argmin(1), minlength=WAYS).float() / 6000
    assert (where_min - 0.2).abs().max() < 0.03
    counts = torch.bincount(classes.flatten(), minlength=len(train_pool)).float()
    assert (counts > 0).float().mean() > 0.99  # 30,000 draws over 4112 classes
    assert counts.mean() == pytest.approx(6000 * WAYS / len(train_pool))
    assert counts.max() < 30


def test_distinct_classes_when_ways_is_close_to_the_pool_size():
    g = gen(6)
    rows = _distinct_classes(3000, 6, 5, g)  # the top-k path
    assert rows.shape == (3000, 5)
    ordered = rows.sort(dim=1).values
    assert (ordered[:, 1:] != ordered[:, :-1]).all()
    left_out = 15 - rows.sum(1)  # which of 0..5 is missing
    frequency = torch.bincount(left_out, minlength=6).float() / 3000
    assert (frequency - 1 / 6).abs().max() < 0.04
    first = torch.bincount(rows[:, 0], minlength=6).float() / 3000
    assert (first - 1 / 6).abs().max() < 0.04


def test_same_seed_same_batch_other_seed_other_batch(sampler):
    a, b = sampler.sample(8, gen(7)), sampler.sample(8, gen(7))
    assert_batches_equal(a, b)
    c = sampler.sample(8, gen(8))
    assert not torch.equal(a.support_x, c.support_x)
    assert not torch.equal(a.query_x, c.query_x)
    # consecutive batches of one generator differ
    g = gen(7)
    first, second = sampler.sample(8, g), sampler.sample(8, g)
    assert_batches_equal(first, a)
    assert not torch.equal(first.support_x, second.support_x)


@pytest.mark.parametrize("start, stop", [(0, 2), (2, 5), (7, 8), (3, 3)])
def test_a_slice_of_the_tasks_equals_that_slice_of_the_full_batch(sampler, start, stop):
    g_full, g_part = gen(9), gen(9)
    full = sampler.sample(8, g_full)
    part = sampler.sample(8, g_part, tasks=slice(start, stop))
    assert part.num_tasks == stop - start
    assert_batches_equal(part, full.select(slice(start, stop)))
    # the generators stay in step, so every rank draws the same next batch
    assert_batches_equal(sampler.sample(8, g_full), sampler.sample(8, g_part))


def test_ranks_together_make_the_full_batch(sampler):
    full = sampler.sample(12, gen(10))
    shares = [sampler.sample(12, gen(10), tasks=slice(r * 3, (r + 1) * 3)) for r in range(4)]
    for field in ("support_x", "support_y", "query_x", "query_y"):
        joined = torch.cat([getattr(s, field) for s in shares])
        assert torch.equal(joined, getattr(full, field))


def test_random_rotations_of_the_maml_split(omniglot, raw):
    pool = omniglot_split(omniglot, "maml", "train")
    sampler = EpisodeSampler(raw, pool, ways=5, shots=1, query=1)
    classes, draws, rotations = sampler.sample_indices(4000, gen(11))
    share = torch.bincount(rotations.flatten(), minlength=4).float() / rotations.numel()
    assert share.shape == (4,) and (share - 0.25).abs().max() < 0.02
    batch = sampler.sample(4000, gen(11))
    expected = expected_images(raw, pool, classes[:20], draws[:20], rotations[:20]).float() / 255
    assert torch.equal(batch.support_x[:20, :, 0], expected[:, :, 0])
    assert torch.equal(batch.query_x[:20, :, 0], expected[:, :, 1])
    # the same class gets different rotations in different tasks
    flat_classes, flat_rotations = classes.flatten(), rotations.flatten()
    frequent = flat_classes.mode().values  # drawn in about 18 of the 4000 tasks
    assert torch.unique(flat_rotations[flat_classes == frequent]).numel() > 1


def test_lake_split_episodes_are_unrotated(omniglot, raw):
    pool = omniglot_split(omniglot, "lake", "test")
    sampler = EpisodeSampler(raw, pool, ways=20, shots=1, query=1)
    classes, draws, rotations = sampler.sample_indices(3, gen(12))
    assert (rotations == 0).all()
    batch = sampler.sample(3, gen(12))
    expected = expected_images(raw, pool, classes, draws, rotations).float() / 255
    assert torch.equal(batch.support_x[:, :, 0], expected[:, :, 0])


def test_shots_plus_query_beyond_the_drawings(raw, train_pool):
    """A sampler of one's own names its arguments; a run's (build_task_source: test=False or True)
    the options that set the shape, as the caller spells them: the TaskConfig fields from Python,
    the flags on the command line (the CLI prints ``with_flags()``)."""
    with pytest.raises(OptionError) as info:
        EpisodeSampler(raw, train_pool, ways=5, shots=15, query=10, dataset="omniglot")
    own = "omniglot has 20 images per class; shots=15 with query=10 needs 25. Lower shots or query."
    assert str(info.value) == info.value.with_flags() == own
    with pytest.raises(OptionError) as info:
        EpisodeSampler(raw, train_pool, ways=5, shots=15, query=10, dataset="omniglot", test=False)
    assert str(info.value) == own  # the TaskConfig's fields are the arguments' names
    assert info.value.with_flags() == ("omniglot has 20 images per class; --shots 15 with --query 10 needs 25. Lower "
                                       "--shots or --query.")
    with pytest.raises(OptionError) as info:
        EpisodeSampler(raw, train_pool, ways=5, shots=15, query=10, dataset="omniglot", test=True)
    assert str(info.value) == ("omniglot has 20 images per class; test_shots=15 with test_query=10 needs 25. Lower "
                               "test_shots or test_query (in evaluate_run: episode_shape's shots or query).")
    assert info.value.with_flags() == ("omniglot has 20 images per class; --test-shots 15 with --test-query 10 needs "
                                       "25. Lower --test-shots or --test-query (in metalearn eval and compare: "
                                       "--shots or --query).")


def test_more_ways_than_classes(omniglot, raw):
    pool = omniglot_split(omniglot, "lake", "test")
    with pytest.raises(OptionError) as info:
        EpisodeSampler(raw, pool, ways=700, shots=1, query=1, dataset="omniglot")
    own = ("omniglot split lake/test has 659 classes; ways=700 is more than that. Lower ways or use a pool with more "
           "classes.")
    assert str(info.value) == info.value.with_flags() == own
    with pytest.raises(OptionError) as info:
        EpisodeSampler(raw, pool, ways=700, shots=1, query=1, dataset="omniglot", test=False)
    assert str(info.value) == ("omniglot split lake/test has 659 classes; ways=700 is more than that. Lower ways or "
                               "use a split part with more classes.")
    assert info.value.with_flags() == ("omniglot split lake/test has 659 classes; --ways 700 is more than that. Lower "
                                       "--ways or use a split part with more classes.")
    with pytest.raises(OptionError) as info:  # the test episodes' ways, following the training ones
        EpisodeSampler(raw, pool, ways=700, shots=1, query=1, dataset="omniglot", test=True, ways_follow=True)
    assert str(info.value) == ("omniglot split lake/test has 659 classes; test_ways=700 (it defaults to ways) is more "
                               "than that. Lower test_ways (in evaluate_run: episode_shape's ways) or use a split "
                               "part with more classes.")
    assert info.value.with_flags() == ("omniglot split lake/test has 659 classes; --test-ways 700 (it defaults to "
                                       "--ways) is more than that. Lower --test-ways (in metalearn eval and compare: "
                                       "--ways) or use a split part with more classes.")
    with pytest.raises(OptionError) as info:  # test ways of their own: no note that they follow
        EpisodeSampler(raw, pool, ways=700, shots=1, query=1, dataset="omniglot", test=True)
    assert info.value.with_flags() == ("omniglot split lake/test has 659 classes; --test-ways 700 is more than that. "
                                       "Lower --test-ways (in metalearn eval and compare: --ways) or use a split part "
                                       "with more classes.")
    EpisodeSampler(raw, ClassPool("two", torch.tensor([0, 1]), torch.tensor([0, 0])), 2, 1, 1)


def test_an_evaluation_of_the_training_part_names_the_test_options(omniglot_data_dir, omniglot):
    """metalearn eval --part train draws test-shaped episodes from the training classes: a shape
    they cannot fill is refused with the options that set it, an evaluation's own (eval's --ways,
    evaluate_run's episode_shape: it has no --test-ways); a run's test parts with train's test
    options, noting the ways that follow --ways only where they do."""
    from metalearn.config import TaskConfig
    from metalearn.tasks import build_task_source

    with pytest.raises(OptionError) as info:
        build_task_source(TaskConfig(ways=5, test_ways=5000), "train", data_dir=omniglot_data_dir, progress=False,
                          evaluation=True)
    assert info.value.with_flags() == ("omniglot split maml/train has 1100 classes; --ways 5000 is more than that. "
                                       "Lower --ways to 1100 or fewer.")
    assert str(info.value) == ("omniglot split maml/train has 1100 classes; episode_shape's ways 5000 is more than "
                               "that. Lower episode_shape's ways to 1100 or fewer.")
    with pytest.raises(OptionError) as info:  # an evaluation keeping the run's ways (no test ways of its own)
        build_task_source(TaskConfig(ways=5000), "test", data_dir=omniglot_data_dir, progress=False, evaluation=True)
    assert "; --ways 5000 (the run's) is more than that. Lower --ways to 423 or fewer." in info.value.with_flags()
    with pytest.raises(OptionError) as info:
        build_task_source(TaskConfig(ways=5000), "test", data_dir=omniglot_data_dir, progress=False)
    assert "--test-ways 5000 (it defaults to --ways) is more than that" in info.value.with_flags()
    with pytest.raises(OptionError) as info:  # training episodes: the training options
        build_task_source(TaskConfig(ways=5000), "train", data_dir=omniglot_data_dir, progress=False)
    assert info.value.with_flags().startswith("omniglot split maml/train has 1100 classes; --ways 5000 is more")


def test_a_folder_path_with_braces_is_quoted_as_it_is(raw, omniglot):
    """The dataset's name (an image folder's path) is no template: braces in it stay as they are."""
    pool = omniglot_split(omniglot, "lake", "test")
    with pytest.raises(OptionError) as info:
        EpisodeSampler(raw, pool, ways=700, shots=1, query=1, dataset="image folder /d/{ways}{{x}}", test=True)
    assert str(info.value).startswith("image folder /d/{ways}{{x}} split lake/test has 659 classes; test_ways=700")
    assert info.value.with_flags().startswith("image folder /d/{ways}{{x}} split lake/test has 659 classes; "
                                              "--test-ways 700")


@pytest.mark.parametrize("ways", [1, 0, -3])
def test_fewer_than_two_ways(raw, train_pool, ways):
    with pytest.raises(MetalearnError, match=f"^ways must be at least 2, got {ways}$"):
        EpisodeSampler(raw, train_pool, ways=ways, shots=1, query=1)
    with pytest.raises(OptionError, match=f"^ways must be at least 2, got {ways}$") as info:
        EpisodeSampler(raw, train_pool, ways=ways, shots=1, query=1, test=False)
    assert info.value.with_flags() == f"--ways must be at least 2, got {ways}"
    with pytest.raises(OptionError) as info:
        EpisodeSampler(raw, train_pool, ways=ways, shots=1, query=1, test=True)
    assert str(info.value) == f"test_ways must be at least 2, got {ways} (in evaluate_run: episode_shape's ways)"
    assert info.value.with_flags() == (f"--test-ways must be at least 2, got {ways} (in metalearn eval and compare: "
                                       "--ways)")


@pytest.mark.parametrize("shots, query", [(0, 5), (1, 0)])
def test_no_shots_or_no_query(raw, train_pool, shots, query):
    with pytest.raises(MetalearnError, match=f"got {shots} and {query}"):
        EpisodeSampler(raw, train_pool, ways=5, shots=shots, query=query)


def test_mixed_fixed_and_random_rotations_are_refused(raw):
    pool = ClassPool("odd", torch.tensor([0, 1, 2]), torch.tensor([0, -1, 1]))
    with pytest.raises(MetalearnError, match="mixes fixed and random rotations"):
        EpisodeSampler(raw, pool, ways=2, shots=1, query=1)


def test_batch_to_and_select(sampler):
    """``select`` with an index tensor (any order, repeats) picks those tasks in every field.
    Episode labels are the same in every task (0..ways-1 by class) and episodes carry no
    ``task_params``, so each task here gets labels named by its own permutation and a
    parameter of its own: a field taken from the wrong task would show."""
    sampled = sampler.sample(4, gen(13))
    names = torch.stack([torch.randperm(WAYS, generator=gen(t)) for t in range(4)])  # task t calls class k names[t, k]
    batch = TaskBatch(sampled.support_x, names.gather(1, sampled.support_y), sampled.query_x,
                      names.gather(1, sampled.query_y), WAYS, {"task": torch.arange(4.0) * 10})
    fields = ("support_x", "support_y", "query_x", "query_y")
    for field in fields:
        values = getattr(batch, field)
        assert all(not torch.equal(values[i], values[j]) for i in range(4) for j in range(i)), field
    moved = batch.to("cpu")
    assert_batches_equal(moved, batch)
    assert torch.equal(moved.task_params["task"], batch.task_params["task"])
    index = [3, 1, 1]
    picked = batch.select(torch.tensor(index))
    assert picked.num_tasks == 3 and picked.ways == WAYS
    for field in fields:
        assert torch.equal(getattr(picked, field), torch.stack([getattr(batch, field)[t] for t in index])), field
    assert picked.task_params.keys() == {"task"}
    assert picked.task_params["task"].tolist() == [30.0, 10.0, 10.0]


def test_images_of_another_kind_are_refused_with_what_it_takes():
    """Your own images: uint8 (classes, examples, [C,] H, W) like Omniglot's; others get a message
    instead of silently wrong pixels (floats divided by 255 again) or batches of the wrong rank."""
    pool = ClassPool("mine", torch.arange(4), torch.zeros(4, dtype=torch.long))
    for images in (torch.rand(4, 6, 16, 16), torch.zeros(4, 6, 3, 1, 16, 16, dtype=torch.uint8)):
        with pytest.raises(MetalearnError, match=r"uint8 images shaped \(classes, examples, \[C,\] H, W\)"):
            EpisodeSampler(images, pool, 2, 1, 1)
    rgb = torch.randint(0, 255, (4, 6, 3, 16, 16), dtype=torch.uint8)
    batch = EpisodeSampler(rgb, pool, 2, 1, 1).sample(3, gen(0))
    assert batch.support_x.shape == (3, 2, 3, 16, 16)
    wide = torch.randint(0, 255, (4, 6, 16, 20), dtype=torch.uint8)
    batch = EpisodeSampler(wide, pool, 2, 1, 1).sample(3, gen(0))  # not rotated: any shape works
    assert batch.support_x.shape == (3, 2, 1, 16, 20)
    turned = ClassPool("turned", torch.arange(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(MetalearnError, match="rotated classes need square images, got 16x20"):
        EpisodeSampler(wide, turned, 2, 1, 1)


def test_to_a_dtype_converts_the_floating_tensors_and_keeps_the_labels(sampler):
    """Converting the labels too made them floats: the batch then passed for regression and
    MAML fitted the class ids by squared error, without a word."""
    batch = sampler.sample(2, gen(1))
    double = batch.to(torch.float64)
    assert double.support_x.dtype == double.query_x.dtype == torch.float64
    assert double.support_y.dtype == double.query_y.dtype == torch.long and double.is_classification
    assert torch.equal(double.support_x, batch.support_x.double()) and torch.equal(double.query_y, batch.query_y)
    assert batch.to("cpu", torch.float64).query_x.dtype == torch.float64
    assert batch.to(dtype=torch.float64).support_y.dtype == torch.long
    with pytest.raises(MetalearnError, match="torch.int32 is not a floating-point type"):
        batch.to(torch.int32)


def test_a_classification_batch_with_float_labels_is_refused(sampler):
    batch = sampler.sample(2, gen(1))
    with pytest.raises(MetalearnError, match=r"a classification TaskBatch \(ways=5\) takes integer class ids as "
                                             r"labels, but query_y is torch.float32: give them as long"):
        TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y.float(), WAYS)
    with pytest.raises(MetalearnError, match="support_y and query_y are torch.float64"):
        TaskBatch(batch.support_x, batch.support_y.double(), batch.query_x, batch.query_y.double(), WAYS)


def test_the_sampler_draws_the_floating_point_type_asked_for(raw, train_pool, sampler):
    float64 = EpisodeSampler(raw, train_pool, WAYS, SHOTS, QUERY, dtype=torch.float64).sample(3, gen(5))
    float32 = sampler.sample(3, gen(5))
    assert float64.support_x.dtype == float64.query_x.dtype == torch.float64
    assert torch.equal(float64.support_x * 255, (float32.support_x.double() * 255).round())  # the same pixels
    assert torch.equal(float64.query_y, float32.query_y) and float64.query_y.dtype == torch.long
    with pytest.raises(MetalearnError, match="dtype must be a floating-point type, got torch.uint8"):
        EpisodeSampler(raw, train_pool, WAYS, SHOTS, QUERY, dtype=torch.uint8)


def test_from_labels_draws_episodes_of_labelled_vectors():
    """Feature vectors with labels of any values in any order: every drawn example belongs to
    the class its episode label says, support and query are distinct examples, the values are
    the examples' own (no /255), and a ProtoNet scores well-separated classes near 100%."""
    from metalearn import ProtoNet, evaluate
    from metalearn.models import MLP

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([40, 10, 30, 20] * 6 + [10, 30, 30])[torch.randperm(27, generator=g)]
    examples = torch.randn(27, 5, generator=g, dtype=torch.float64) * 0.1
    examples[:, 0] = labels.double()  # an example's class is readable from it
    examples[:, 1] = torch.arange(27).double()  # and which example it is
    sampler = EpisodeSampler.from_labels(examples.numpy(), labels.numpy(), ways=3, shots=2, query=3)
    assert sampler.labels.tolist() == [10, 20, 30, 40]
    batch = sampler.sample(50, torch.Generator().manual_seed(1))
    assert batch.support_x.shape == (50, 6, 5) and batch.query_x.shape == (50, 9, 5)
    assert batch.support_x.dtype == torch.float32 and batch.ways == 3
    for t in range(50):
        drawn = torch.cat([batch.support_x[t, :, 1], batch.query_x[t, :, 1]])
        assert drawn.unique().numel() == 15  # distinct examples
        for x, y in ((batch.support_x[t], batch.support_y[t]), (batch.query_x[t], batch.query_y[t])):
            for episode_label in range(3):  # one original class per episode label, the same in both sets
                assert x[y == episode_label, 0].unique().numel() == 1
        assert torch.equal(batch.support_x[t, ::2, 0], batch.query_x[t, ::3, 0])
        assert batch.support_x[t, ::2, 0].unique().numel() == 3
    torch.testing.assert_close(batch.support_x[0, 0].double(), examples[int(batch.support_x[0, 0, 1])], atol=1e-6,
                               rtol=0)
    separated = torch.cat([torch.randn(20, 4, generator=g) * 0.3 + 4 * torch.eye(4)[c] for c in range(4)])
    learner = ProtoNet(MLP(4, 8, hidden=(16,)))
    result = evaluate(learner, EpisodeSampler.from_labels(separated, torch.arange(4).repeat_interleave(20), 3, 1, 5),
                      episodes=40)
    assert result["mean"] > 90, result


def test_from_labels_takes_uint8_images_as_the_folder_sampler_does():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.tensor([2, 0, 1] * 4)
    sampler = EpisodeSampler.from_labels(images, labels, ways=2, shots=1, query=1)
    batch = sampler.sample(3, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 2, 1, 4, 4) and float(batch.support_x.max()) <= 1.0
    known = {tuple((image.float() / 255).flatten().tolist()) for image in images}
    assert all(tuple(x.flatten().tolist()) in known for x in batch.support_x.reshape(-1, 1, 4, 4))
    assert sampler.augmented("flip").sample(1, torch.Generator().manual_seed(0)).support_x.shape == (1, 2, 1, 4, 4)


def test_from_labels_and_float_examples_refuse_what_they_cannot_draw():
    vectors, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    cases = [
        (lambda: EpisodeSampler.from_labels(vectors, labels.float(), 2, 1, 1), "takes labels as (n,) integers"),
        (lambda: EpisodeSampler.from_labels(vectors, labels[:5], 2, 1, 1), "got (6, 3) examples and 5 labels"),
        (lambda: EpisodeSampler.from_labels(vectors[:, 0], labels, 2, 1, 1), "takes examples (n, ...)"),
        (lambda: EpisodeSampler.from_labels(vectors, labels, 2, 2, 1), "your data has a class of 2 examples; shots=2 "
                                                                      "with query=1 needs 3"),
        (lambda: EpisodeSampler.from_labels(vectors, labels, 4, 1, 1),
         "your data has 3 classes; ways=4 is more than that. Lower ways or give examples of more classes."),
        (lambda: EpisodeSampler.from_labels(vectors, labels, 2, 1, 1).augmented("flip"), "augment changes uint8 "
                                                                                         "images"),
        (lambda: EpisodeSampler(vectors, ClassPool("p", torch.arange(3), torch.zeros(3, dtype=torch.long)), 2, 1, 1),
         "or floating-point examples (n, ...) with class_sizes"),
        (lambda: EpisodeSampler(vectors, ClassPool("p", torch.arange(3), torch.zeros(3, dtype=torch.long)), 2, 1, 1,
                                class_sizes=torch.tensor([4, 0, 2])), "class 1 of the pool has no examples"),
    ]
    for build, message in cases:
        with pytest.raises(MetalearnError) as info:
            build()
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_seed_draws_the_same_episodes_whatever_torch_s_default_dtype():
    """A sampler called directly (not under the Trainer's or evaluate's float32 default) draws
    the same classes, images and augmentations from a seed when a notebook set float64."""
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(8).repeat_interleave(5)
    sampler = EpisodeSampler.from_labels(images, labels, ways=3, shots=1, query=2).augmented("crop,flip,color")
    drawn = sampler.sample(4, torch.Generator().manual_seed(3))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        again = sampler.sample(4, torch.Generator().manual_seed(3))
    finally:
        torch.set_default_dtype(before)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(drawn, name), getattr(again, name)), name
