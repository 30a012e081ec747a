"""Multigrid schedule and short-cycle sampler: reference tables, LR continuity, rank consistency, exact resume."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from multigrid import (
    ClipSpec,
    MultigridSchedule,
    ShortCycleBatchSampler,
    bn_splits_for,
    bn_sync_for,
    count_batches,
    short_cycle_shapes,
)

MODES = {"both": (True, True), "long": (True, False), "short": (False, True), "none": (False, False)}


def demo_schedule(mode: str = "both", lr_policy: str = "cosine", **kw) -> MultigridSchedule:
    """A small CPU-sized schedule: 12 base epochs, per-device batch 8, 8 frames at rate 4, crop 112."""
    long_cycle, short_cycle = MODES[mode]
    args = dict(epochs=12, base_batch=8, base_frames=8, base_crop=112, base_rate=4, lr=0.05, lr_policy=lr_policy,
                warmup_epochs=1, steps=[0, 6, 9] if lr_policy == "steps" else None, long_cycle=long_cycle,
                short_cycle=short_cycle)
    return MultigridSchedule(**{**args, **kw})


def batches(n: int, schedule: MultigridSchedule, **kw) -> list[list[ClipSpec]]:
    return list(ShortCycleBatchSampler(n, schedule, **kw))


# ----------------------------------------------------------------------------------------------------------------------
# Long-cycle schedule
# ----------------------------------------------------------------------------------------------------------------------
def test_pyslowfast_stepwise_reference():
    # SLOWFAST_8x8_R50_stepwise_multigrid: STEPS [0,94,154,196], MAX_EPOCH 239, T 32, S 224, long + short cycle.
    s = MultigridSchedule(epochs=239, base_batch=8, base_frames=32, base_crop=224, base_rate=2, lr=0.1,
                          lr_policy="steps", steps=[0, 94, 154, 196], warmup_epochs=34, warmup_start_lr=0.01)
    assert [st.start for st in s.stages] == [0, 73, 110, 142, 158, 205, 228, 248, 259, 291, 308, 322, 329, 343]
    assert [st.lr_factor for st in s.stages] == pytest.approx(
        [8, 4, 2, 1, 0.8, 0.4, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01, 0.01, 0.001])
    assert s.num_epochs == 358
    assert [st.crop for st in s.stages[:4]] == [158, 158, 224, 224]
    assert [st.frames for st in s.stages[:4]] == [8, 16, 16, 32]
    assert [st.batch_size for st in s.stages[:4]] == [64, 32, 16, 8]
    assert [st.bn_splits for st in s.stages[:4]] == [8, 4, 2, 1]
    assert [(st.rate_min, st.rate_max) for st in s.stages[:4]] == [(2, 8), (2, 4), (2, 4), (2, 2)]
    # Short cycle: 112 and 158 before the long-cycle crop; at crop 158 that makes two iterations at 158, as PySlowFast.
    assert s.stages[0].short_cycle == ((112, 128), (158, 64), (158, 64))
    assert s.stages[3].short_cycle == ((112, 32), (158, 16), (224, 8))
    assert [st.fine_tune for st in s.stages].count(True) == 2
    # Warm-up is stretched with the schedule; afterwards LR = 0.1 × relative LR.
    assert s.warmup_epochs == pytest.approx(34 * 358 / 239)
    assert s.lr_at(100) == pytest.approx(0.4)
    assert s.lr_at(350) == pytest.approx(1e-4)
    assert s.lr_at(0) == pytest.approx(0.08)  # 8 × warm-up start 0.01
    assert s.shape_at(72) == s.stages[0].shape and s.shape_at(73).frames == 16


def pyslowfast_lr_and_shape(steps: list[int], lrs: list[float], shape_ends: list[int], max_epoch: int, epoch: float):
    """PySlowFast's lookups: steps_with_relative_lrs' get_step_index and get_current_long_cycle_shape's first
    schedule entry whose end lies after the epoch (its index into `shape_ends`)."""
    index = next(i for i, step in enumerate([*steps, max_epoch]) if epoch < step) - 1
    return lrs[index], next((i for i, end in enumerate(shape_ends) if epoch < end), len(shape_ends) - 1)


def test_pyslowfast_ssv2_reference_skips_the_empty_stage():
    # configs/SSv2/SLOWFAST_16x8_R50_multigrid.yaml: T 64, S 224, STEPS [0,14,18], MAX_EPOCH 22, 2 clips per GPU on 8
    # GPUs, steps_with_relative_lrs. PySlowFast's schedule entries end at 11/16/21/24, 27/28/30/30 (the last shape of
    # the second LR stage is empty) and 33 (fine-tune), giving STEPS [0,11,16,21,24,27,28,30,30,31] and MAX_EPOCH 33.
    s = MultigridSchedule(epochs=22, base_batch=2, base_frames=64, base_crop=224, base_rate=2, lr=0.1,
                          lr_policy="steps", steps=[0, 14, 18], world_size=8)
    steps = [0, 11, 16, 21, 24, 27, 28, 30, 30, 31]
    lrs = [8, 4, 2, 1, 0.8, 0.4, 0.2, 0.1, 0.1, 0.01]
    shape_ends = [11, 16, 21, 24, 27, 28, 30, 30, 33]
    shapes = [(16, 158), (32, 158), (32, 224), (64, 224)] * 2 + [(64, 224)]
    assert s.num_epochs == 33 and s.added_epochs == 0
    assert [st.start for st in s.stages] == [0, 11, 16, 21, 24, 27, 28, 30, 31]  # PySlowFast's steps, 30 once
    assert [st.lr_factor for st in s.stages] == pytest.approx([8, 4, 2, 1, 0.8, 0.4, 0.2, 0.1, 0.01])
    for epoch in range(s.num_epochs):
        for e in (epoch, epoch + 0.5):  # every epoch trains at PySlowFast's LR and shape
            lr, entry = pyslowfast_lr_and_shape(steps, lrs, shape_ends, 33, e)
            assert s.lr_at(e) == pytest.approx(0.1 * lr), e
            assert (s.stage_at(e).frames, s.stage_at(e).crop) == shapes[entry], e
    # BN at per-device batches 16, 8, 4, 2: PySlowFast's SubBN k=2, BN, SyncBN over 2 and over 4 devices.
    assert [st.bn_mode for st in s.stages[:4]] == ["2", "1", "sync×2", "sync×4"]
    assert [st.shape.bn_sync for st in s.stages[:4]] == [1, 1, 2, 4]
    rows = s.table(num_samples=1000).splitlines()
    assert [row.split()[6] for row in rows[2:6]] == ["2", "1", "sync×2", "sync×4"]
    assert "33 epochs (22 × 1.5)" in rows[0]
    # One process cannot synchronise: plain BN on its own clips.
    single = MultigridSchedule(epochs=22, base_batch=2, base_frames=64, base_crop=224, base_rate=2, lr=0.1,
                               lr_policy="steps", steps=[0, 14, 18])
    assert [st.bn_mode for st in single.stages[:4]] == ["2", "1", "1", "1"]


def test_step_schedules_skip_empty_stages_and_keep_the_total():
    for epochs in range(2, 40):
        s = demo_schedule("both", "steps", epochs=epochs, steps=[0, epochs // 2], warmup_epochs=0)
        assert s.num_epochs == round(epochs * 1.5) and s.added_epochs == 0, epochs
        assert all(st.end > st.start for st in s.stages)
        assert [st.start for st in s.stages[1:]] == [st.end for st in s.stages[:-1]]


def test_long_cycle_only_by_hand():
    # Long cycle without short cycle (PySlowFast raises IndexError here). T0 16, S0 224, steps [0,20,40], 50 epochs.
    # Shapes (t, s) = (4,158) (8,158) (8,224) (16,224); B_rel = round(16·224²/(t·s²)) = round(8.04)=8, 4, 2, 1.
    # No short cycle: mean batch = B_rel, sum 15. Each 20-epoch stage: 20·[8,4,2,1]/15 = 10.667, 5.333, 2.667, 1.333.
    # Iteration saving = 15/4 = 3.75; fine-tune = (50 − 40)/3.75 · 1 = 2.667. Sum = 2·20 + 2.667 = 128/3.
    # Scale to 50 × 1.5 = 75: × 75/(128/3) = 225/128 → 18.75, 9.375, 4.6875, 2.34375 per stage, fine-tune 4.6875.
    # Cumulative: 18.75, 28.125, 32.8125, 35.15625, 53.90625, 63.28125, 67.96875, 70.3125, 75
    #   rounded: 19, 28, 33, 35, 54, 63, 68, 70, 75; fine-tune split at (70 + 75) // 2 = 72.
    s = MultigridSchedule(epochs=50, base_batch=8, base_frames=16, base_crop=224, base_rate=5, lr=0.1,
                          lr_policy="steps", steps=[20, 40], long_cycle=True, short_cycle=False)
    assert [st.start for st in s.stages] == [0, 19, 28, 33, 35, 54, 63, 68, 70, 72]
    assert [st.end for st in s.stages] == [19, 28, 33, 35, 54, 63, 68, 70, 72, 75]
    assert s.num_epochs == 75
    assert [st.lr_factor for st in s.stages] == pytest.approx([8, 4, 2, 1, 0.8, 0.4, 0.2, 0.1, 0.1, 0.01])
    assert [st.rate_max for st in s.stages[:4]] == [20, 10, 10, 5]  # 5 · 16 / t
    assert all(st.short_cycle == ((st.crop, st.batch_size),) for st in s.stages)


def test_short_only_and_none_step_schedules():
    short = demo_schedule("short", "steps")  # PySlowFast: int(step × 1.5), int(12 × 1.5)
    assert [(st.start, st.end) for st in short.stages] == [(0, 9), (9, 13), (13, 18)]
    assert [st.lr_factor for st in short.stages] == pytest.approx([1, 0.1, 0.01])
    assert short.stages[0].short_cycle == ((56, 32), (79, 16), (112, 8))  # 4×, 2×, 1× at the base crop
    plain = demo_schedule("none", "steps")
    assert [(st.start, st.end) for st in plain.stages] == [(0, 6), (6, 9), (9, 12)]
    assert plain.stages[0].short_cycle == ((112, 8),) and plain.warmup_epochs == 1
    assert plain.lr_at(7.5) == pytest.approx(0.005)
    cosine = demo_schedule("none")
    assert len(cosine.stages) == 1 and cosine.num_epochs == 12
    assert cosine.lr_at(6) == pytest.approx(0.025)  # half-way through the cosine


def test_cosine_long_cycle_layout_gives_equal_iterations_per_shape():
    s = MultigridSchedule(epochs=300, base_batch=16, base_frames=16, base_crop=224, base_rate=5, lr=0.1,
                          warmup_epochs=35)
    assert s.num_epochs == 450 and len(s.stages) == 3 * 4 + 1 and s.stages[-1].fine_tune
    mean_batch = [32 / 3, 16 / 3, 14 / 3, 7 / 3]  # PySlowFast's mean over the short cycle (see the first test)
    for cycle in range(3):
        rows = [st for st in s.stages if st.cycle == cycle]
        iters = [(st.end - st.start) / b for st, b in zip(rows, mean_batch)]
        assert max(iters) - min(iters) < 1.0 / min(mean_batch)  # equal up to one epoch of rounding


def test_cosine_takes_the_most_long_cycles_that_train_every_shape():
    for epochs in range(1, 41):
        s = demo_schedule("both", epochs=epochs, warmup_epochs=0)
        assert all(st.end > st.start for st in s.stages), epochs
        assert [st.start for st in s.stages[1:]] == [st.end for st in s.stages[:-1]]
        cycles = (len(s.stages) - 1) // 4
        assert len(s.stages) == 4 * cycles + 1 and 1 <= cycles <= 3  # whole cycles of the 4 shapes, then fine-tune
        assert s.num_epochs == round(epochs * 1.5) + s.added_epochs
        assert s.added_epochs == 0 or (cycles == 1 and epochs < 8), epochs  # only to fit a single cycle
        if cycles < 3:  # one more cycle would have left a stage empty
            ends = s._round_layout(s._long_cycle_layout([epochs * j / (cycles + 2) for j in range(cycles + 2)]))
            assert any(a == b for a, b in zip([0, *ends], ends)), epochs
    # 12 × 1.5 = 18 epochs: three (and two) cycles would round the base shape of the first cycle to zero epochs.
    demo = demo_schedule("both")
    assert [(st.start, st.end) for st in demo.stages] == [(0, 6), (6, 9), (9, 12), (12, 13), (13, 18)]
    assert len(demo_schedule("both", epochs=30).stages) == 13  # make demo's 30 epochs: three cycles
    short = demo_schedule("both", epochs=2, warmup_epochs=0)  # 3 epochs cannot hold 5 stages: 2 are added, and said
    assert short.num_epochs == 5 and short.added_epochs == 2
    assert "5 epochs (2 × 1.5, +2 so that every shape trains at least one epoch)" in short.table()


# ----------------------------------------------------------------------------------------------------------------------
# Learning rate
# ----------------------------------------------------------------------------------------------------------------------
def test_cosine_lr_is_continuous_up_to_the_batch_factor():
    s = demo_schedule("both", epochs=20, warmup_epochs=2)  # 30 epochs, warm-up ends at 3
    eps = 1e-7
    w = s.warmup_epochs
    assert w == pytest.approx(3.0) and all(st.start != w for st in s.stages)
    assert s.lr_at(w - eps) == pytest.approx(s.lr_at(w + eps), rel=1e-5)
    assert s.lr_at(0) == pytest.approx(0.005 * s.stages[0].batch_factor)
    cosine = [s.lr_at(e) / s.stage_at(e).batch_factor for e in (w, 10.3, 29.5)]
    assert cosine == pytest.approx([0.025 * (1 + math.cos(math.pi * e / 30)) for e in (w, 10.3, 29.5)])
    for before, after in zip(s.stages, s.stages[1:]):
        b = after.start
        lr_before, lr_after = s.lr_at(b - eps), s.lr_at(b)
        assert lr_after / lr_before == pytest.approx(after.batch_factor / before.batch_factor, rel=1e-5)
    assert s.lr_at(s.num_epochs) == pytest.approx(0.0, abs=1e-12)


def test_warmup_crossing_a_shape_change_still_only_jumps_by_batch_factor():
    s = demo_schedule("both", epochs=11, warmup_epochs=3)  # stretched warm-up 4.36 epochs spans shapes 0..2
    assert [st.start for st in s.stages[1:3]] == [2, 3] and s.warmup_epochs > 3
    for b in (2, 3):
        before, after = s.stage_at(b - 1), s.stage_at(b)
        ratio = s.lr_at(b) / s.lr_at(b - 1e-7)
        assert ratio == pytest.approx(after.batch_factor / before.batch_factor, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# BN splits and short-cycle shapes
# ----------------------------------------------------------------------------------------------------------------------
def test_short_cycle_shapes_and_degenerate_case():
    assert short_cycle_shapes(224, 224) == [(112, 4), (158, 2), (224, 1)]
    # At the long-cycle crop S0/√2 the last two iterations share a shape and both run (PySlowFast): half the clips at
    # S0/2, and the three-entry mean batch the long-cycle split assumes.
    assert short_cycle_shapes(158, 224) == [(112, 2), (158, 1), (158, 1)]
    assert short_cycle_shapes(79, 112) == [(56, 2), (79, 1), (79, 1)]
    s = demo_schedule("both")
    stage = s.stages[0]  # 2 × 56², batch 64
    assert stage.short_cycle == ((56, 128), (79, 64), (79, 64))
    assert s.iterations(0, 1000) == count_batches(1000, [128, 64, 64]) == 11  # 3 cycles, then 128 + 64
    batch = sum(b for _, b in stage.short_cycle) / 3
    assert batch / stage.batch_size == pytest.approx(s._mean_batch_factor(stage.frames, stage.crop) / 8)


def test_bn_splits_divide_every_batch():
    assert [bn_splits_for(b) for b in (1, 7, 8, 16, 44, 64, 144)] == [1, 1, 1, 2, 4, 8, 18]
    for base_batch in range(1, 21):
        for frames, crop in ((4, 160), (13, 160), (16, 224), (8, 112)):
            for mode in ("both", "long", "short"):
                s = MultigridSchedule(epochs=30, base_batch=base_batch, base_frames=frames, base_crop=crop,
                                      base_rate=5, lr=0.1, long_cycle=MODES[mode][0], short_cycle=MODES[mode][1])
                for st in s.stages:
                    assert 1 <= st.bn_splits <= max(1, st.batch_size // 8)
                    assert all(size % st.bn_splits == 0 for _, size in st.short_cycle)
                    assert st.batch_size % st.bn_splits == 0  # precise BN's plain batches


def test_sync_bn_devices_hold_enough_clips():
    # (per-device batch, world size) -> devices: ceil(8 / batch), rounded up to a divisor of the world size.
    cases = {(16, 8): 1, (8, 8): 1, (4, 8): 2, (5, 8): 2, (3, 8): 4, (2, 8): 4, (1, 8): 8, (1, 16): 8, (2, 1): 1,
             (2, 2): 2, (2, 6): 6, (3, 6): 3, (1, 4): 4, (2, 12): 4}
    assert {case: bn_sync_for(*case) for case in cases} == cases
    for batch in range(1, 9):
        for world in range(1, 17):
            g = bn_sync_for(batch, world)
            assert world % g == 0 and (g * batch >= 8 or g == world)
            assert all(world % h or h * batch < 8 for h in range(1, g))  # no smaller group would do
    # X3D-L: 4 clips per GPU at the base shape on 8 GPUs; the coarse shapes hold 8 and more.
    s = MultigridSchedule(epochs=256, base_batch=4, base_frames=16, base_crop=312, base_rate=5, lr=0.05,
                          world_size=8)
    assert [st.bn_mode for st in s.stages[:4]] == ["4", "2", "1", "sync×2"]
    assert s.stages[-1].shape.bn_sync == 2 and s.stages[0].shape.bn_sync == 1


def test_table_prints_every_stage():
    s = MultigridSchedule(epochs=239, base_batch=8, base_frames=32, base_crop=224, base_rate=2, lr=0.1,
                          lr_policy="steps", steps=[0, 94, 154, 196])
    text = s.table(num_samples=240_000, world_size=8)
    lines = text.splitlines()
    assert len(lines) == 2 + len(s.stages) and "358 epochs" in lines[0]
    assert "329-343" in text and "128@112 64@158 64@158" in lines[2] and lines[-1].split()[0] == "ft"
    assert [line.split()[6] for line in lines[2:6]] == ["8", "4", "2", "1"]  # BN splits per device
    assert lines[2].split()[8] == str(s.iterations(0, 240_000, 8))
    print(demo_schedule().table(num_samples=400))


# ----------------------------------------------------------------------------------------------------------------------
# Short-cycle batch sampler
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("lr_policy", ["cosine", "steps"])
def test_every_mode_builds_and_iterates(mode, lr_policy):
    s = demo_schedule(mode, lr_policy)
    assert s.num_epochs == (12 if mode == "none" else 18)
    for epoch in range(s.num_epochs):
        stage = s.stage_at(epoch)
        out = batches(300, s, epoch=epoch, seed=1)
        assert len(out) == s.iterations(epoch, 300)
        for it, batch in enumerate(out):
            crop, size = stage.short_cycle[it % len(stage.short_cycle)]
            assert len(batch) == size and {(c.crop, c.frames) for c in batch} == {(crop, stage.frames)}
        assert 0 < s.lr_at(epoch + 0.5) <= 0.05 * 8


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_agree_on_shapes_and_cover_the_dataset(world):
    s = demo_schedule("short", base_batch=4)  # short cycle at the base shape: 16, 8, 4 clips (28 per cycle)
    n = 224  # 112 or 56 per rank: whole cycles, nothing dropped
    per_rank = [batches(n, s, epoch=3, rank=r, world_size=world, seed=7) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    for it in range(len(per_rank[0])):
        assert len({(len(b[it]), b[it][0].crop, b[it][0].frames) for b in per_rank}) == 1
    specs = [c for rank in per_rank for batch in rank for c in batch]
    assert sorted(c.index for c in specs) == list(range(n))
    # Index and seed belong to the position in the permutation, not to the rank: one process yields the same pairs.
    single = [c for batch in batches(n, s, epoch=3, seed=7) for c in batch]
    assert sorted((c.index, c.seed) for c in specs) == sorted((c.index, c.seed) for c in single)


def test_padding_repeats_samples_so_every_rank_has_the_same_count():
    s = demo_schedule("none", base_batch=2)
    per_rank = [batches(13, s, rank=r, world_size=4) for r in range(4)]  # padded to 16: 4 per rank, 2 batches each
    assert [len(b) for b in per_rank] == [2, 2, 2, 2]
    indices = [c.index for rank in per_rank for batch in rank for c in batch]
    assert set(indices) == set(range(13)) and len(indices) == 16


def test_determinism_from_seed_and_epoch():
    s = demo_schedule()
    first = batches(300, s, epoch=6, seed=3)
    assert first == batches(300, s, epoch=6, seed=3)
    assert [c.index for b in first for c in b] != [c.index for b in batches(300, s, epoch=6, seed=4) for c in b]
    sampler = ShortCycleBatchSampler(300, s, epoch=0, seed=3)
    sampler.set_epoch(6)
    assert list(sampler) == first
    seeds = [c.seed for b in first for c in b]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < 2**63 for x in seeds)


@pytest.mark.parametrize("world", [1, 2])
def test_start_iter_resume_equals_the_tail(world):
    s = demo_schedule()
    full = batches(300, s, epoch=12, rank=world - 1, world_size=world, seed=2)  # the base shape: 32, 16, 8 clips
    assert len(full) > 5
    for k in range(len(full) + 1):
        sampler = ShortCycleBatchSampler(300, s, epoch=12, rank=world - 1, world_size=world, seed=2, start_iter=k)
        assert len(sampler) == len(full) - k and list(sampler) == full[k:]


@pytest.mark.parametrize("world", [1, 2])
def test_one_stream_over_epochs_equals_the_epochs_one_after_another(world):
    s = demo_schedule(epochs=11)  # three long cycles of short stages
    kw = dict(rank=world - 1, world_size=world, seed=2)
    per_epoch = [batches(300, s, epoch=e, **kw) for e in range(3, 9)]  # crosses long-cycle shape changes
    assert len({b[0].frames for epoch in per_epoch for b in epoch}) > 1
    stream = ShortCycleBatchSampler(300, s, epoch=3, start_iter=2, end_epoch=9, **kw)
    assert [stream.batches_in(e) for e in range(3, 9)] == [len(b) for b in per_epoch]
    assert len(stream) == sum(map(len, per_epoch)) - 2
    assert list(stream) == [b for epoch in per_epoch for b in epoch][2:]
    assert list(ShortCycleBatchSampler(300, s, epoch=9, end_epoch=9, **kw)) == []  # nothing left to train


def test_precise_bn_batches_are_plain_long_cycle_batches():
    s = demo_schedule()
    out = batches(300, s, epoch=0, short_cycle=False)
    stage = s.stage_at(0)
    assert len(out) == 300 // stage.batch_size == s.iterations(0, 300, short_cycle=False)
    assert all(len(b) == stage.batch_size and b[0].crop == stage.crop for b in out)


def test_count_batches_drops_only_the_last_partial_batch():
    assert count_batches(28, [16, 8, 4]) == 3
    assert count_batches(27, [16, 8, 4]) == 2
    assert count_batches(55, [16, 8, 4]) == 5  # 28 + 16 + 8, then 3 < 4
    assert count_batches(7, [8]) == 0


class _ShapeDataset(Dataset):
    def __len__(self) -> int:
        return 50

    def __getitem__(self, spec: ClipSpec):
        return torch.zeros(3, spec.frames, spec.crop, spec.crop), spec.index


def test_works_as_a_dataloader_batch_sampler():
    s = demo_schedule("short", base_batch=2)
    loader = DataLoader(_ShapeDataset(), batch_sampler=ShortCycleBatchSampler(50, s, epoch=0))
    shapes = [tuple(clips.shape) for clips, _ in loader]
    assert shapes[:3] == [(8, 3, 8, 56, 56), (4, 3, 8, 79, 79), (2, 3, 8, 112, 112)]
    assert len(shapes) == len(loader) == count_batches(50, [8, 4, 2])


def test_clear_errors():
    with pytest.raises(ValueError, match="needs steps"):
        demo_schedule("both", "steps", steps=None)
    with pytest.raises(ValueError, match="at least one step"):
        demo_schedule("both", "steps", steps=[])
    with pytest.raises(ValueError, match="steps must increase"):
        demo_schedule("none", "steps", steps=[5, 3])
    with pytest.raises(ValueError, match="warmup_epochs"):
        demo_schedule(warmup_epochs=12)
    with pytest.raises(ValueError, match="no whole epoch"):
        demo_schedule("short", epochs=1, warmup_epochs=0, epoch_factor=0.5)
    with pytest.raises(ValueError, match="rank"):
        ShortCycleBatchSampler(10, demo_schedule(), rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_iter"):
        ShortCycleBatchSampler(10, demo_schedule(), start_iter=5)


def test_min_frames_floors_the_long_cycle_and_rescales_its_batch():
    # X3D-XS's 4-frame base: the paper's coarsest shape is 1 frame; with a floor of 2 its batch factor halves to 4
    paper = demo_schedule(base_frames=4, base_rate=12)
    floored = demo_schedule(base_frames=4, base_rate=12, min_frames=2)
    assert [(st.frames, st.batch_factor) for st in paper.stages[:4]] == [(1, 8), (2, 4), (2, 2), (4, 1)]
    assert [(st.frames, st.batch_factor) for st in floored.stages[:4]] == [(2, 4), (2, 4), (2, 2), (4, 1)]
    assert (floored.stages[0].rate_min, floored.stages[0].rate_max) == (12, 24)  # still spans the base clip
    assert demo_schedule(min_frames=2).stages[:4] == demo_schedule().stages[:4]  # 8 frames: T0/4 = 2 already
    assert demo_schedule(base_frames=4, min_frames=9).stages[0].frames == 4  # never above the base
    with pytest.raises(ValueError, match="min_frames"):
        demo_schedule(min_frames=0)
