"""Multigrid training (Wu et al., CVPR 2020): long-cycle shapes, short-cycle batches and the LR per fractional epoch.

Pure and dataset-agnostic: everything here is a function of the base settings, the epoch and the seed, so a resumed run
recomputes it and nothing about it is stored. The base shape is T0 frames, an S0 crop and B0 clips per device.

Long cycle. Epoch by epoch the clip shape runs coarse to fine through (t, s) = (T0/4, S0/√2), (T0/2, S0/√2),
(T0/2, S0), (T0, S0) with per-device batch B_rel·B0, B_rel = round(T0·S0² / (t·s²)) = 8, 4, 2, 1, so batch × T × H × W
stays about constant, and LR = base LR × B_rel (linear scaling). Every LR stage of a step schedule is split over the
four shapes in proportion to their mean batch (short cycle included), which gives each shape the same number of
iterations; a fine-tune phase at the base shape follows with the same iteration saving as the rest. All lengths are
then scaled to a total of epochs × epoch_factor and the cumulative stage ends rounded to whole epochs. This is
PySlowFast's `get_long_cycle_schedule`, reproduced exactly: its SlowFast reference (steps 0/94/154/196, 239 epochs,
T0 32, S0 224) becomes stage starts 0/73/110/142/158/205/228/248/259/291/308/322/329/343, relative LRs 8/4/2/1/0.8/
0.4/0.2/0.1/0.08/0.04/0.02/0.01/0.01/0.001 and 358 epochs; the fine-tune phase keeps the last stage's decay for its
first half and decays once more for the second, as PySlowFast does.

Cosine (X3D's recipe; PySlowFast's multigrid rejects it). The base recipe's epochs are cut into c + 1 equal parts,
c = `cosine_cycles` unless that leaves a stage empty (see below): the first c parts are long cycles and the last is the
fine-tune phase, laid out by the rule above as if they were step stages without decay (the SlowFast reference has the
same layout: three LR stages and a final phase). LR(e) = B_rel(e) × cosine(e / num_epochs) over the stretched
epochs: by linear scaling a k-times bigger batch takes a k-times bigger LR at the same point of training counted in
samples seen, so the cosine part is continuous and the LR jumps only by the batch-factor change at shape boundaries.

Warm-up: linear from `warmup_start_lr` to the base-shape LR at the warm-up end, times the batch factor as everywhere.
`warmup_epochs` is in the base recipe's epochs and is stretched with the rest (× num_epochs / epochs). PySlowFast
ramps the unscaled start LR to the scaled target and does not stretch the warm-up; those are the only LR differences.

Empty stages: rounding can leave a stage zero epochs (short trainings, or a short last shape such as PySlowFast's SSv2
config, steps 0/14/18 of 22 epochs at T0 64: its second LR stage ends 27/28/30/30). A step schedule skips it, as
PySlowFast does (its step list then holds the same epoch twice): no other stage is lengthened or shortened, so every
epoch trains at PySlowFast's shape and LR and the total stays round(epochs × epoch_factor). Under cosine the number of
long cycles is the largest, up to `cosine_cycles`, that leaves every stage at least one epoch, so each cycle still goes
from the coarsest shape to the base shape. A training too short for even one such cycle (a few epochs) gives each empty
stage one epoch and grows the total by that many; `added_epochs` holds the number and the table's header states it. The
cosine LR follows the shape actually trained (B_rel × cosine of the epoch), so no epoch runs at another shape's LR.

Short cycle (every iteration): crops round(S0/2), round(S0/√2) and the long-cycle crop s, with per-device batch
multipliers round((s / (f·S0))²) → 4, 2, 1 at s = S0. At s = S0/√2 it is 2, 1, 1 and the last two iterations have the
same shape; both run, as in PySlowFast, so half the clips stay at s and the three-entry mean batch of the long-cycle
split above is the one actually trained. LR and BN do not change inside the cycle.

Epoch totals: long cycle → round(epochs × epoch_factor); short cycle alone → PySlowFast's int(steps × epoch_factor)
and int(epochs × epoch_factor); neither → the plain fixed-shape recipe, so the same code trains the baseline.

BN: each BN should see about bn_base_size (8) clips of the long-cycle batch, however many clips a device holds. Above
that, sub-batch BN: the split count is the largest divisor of the per-device batch that is at most batch / bn_base_size,
so it divides the long-cycle batch and every short-cycle batch (multiples of it). At it, plain BN. Below it (X3D-L/XL on
2-4 clips per device), synchronised BN over the fewest consecutive ranks that together hold at least bn_base_size
clips, ceil(bn_base_size / batch), rounded up to a divisor of `world_size` so that the ranks split into equal groups
(PySlowFast's NUM_SYNC_DEVICES = int(bn_base_size / batch) can leave a group fewer clips); all ranks when no smaller
divisor is enough, and plain BN with one process.
Sampling rate: a clip of t < T0 frames draws its rate from [rate, floor(rate·T0/t)], so it can still span the base
clip's time (PySlowFast uses rate·(T0 // t)).

Fewest frames: `min_frames` raises every long-cycle shape to at least that many frames (its batch factor follows from
the formula above). The default 1 is the paper's rule; with T0 = 4 (X3D-XS) its coarsest shape is then a single frame,
which shows no motion, and the recipes default to 2 (benchmarks/README.md says what that changed on the demo).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import Sampler

# (frames, crop) factors of the base shape, coarse to fine; the spatial factors of the short cycle.
LONG_CYCLE_FACTORS = ((0.25, 0.5**0.5), (0.5, 0.5**0.5), (0.5, 1.0), (1.0, 1.0))
SHORT_CYCLE_FACTORS = (0.5, 0.5**0.5)
_MASK64 = (1 << 64) - 1


class ClipSpec(NamedTuple):
    """What the batch sampler hands the dataset for one sample; `seed` drives every random choice for that clip."""

    index: int
    frames: int
    crop: int
    rate_min: int
    rate_max: int
    seed: int


class LongCycleShape(NamedTuple):
    """The clip shape of one epoch: frames, crop, per-device batch, BN mode (splits, sync devices), sampling rates."""

    frames: int
    crop: int
    batch_size: int
    bn_splits: int
    rate_min: int
    rate_max: int
    bn_sync: int


@dataclass(frozen=True)
class Stage:
    """Epochs [start, end) at one long-cycle shape and one LR level: a row of the table and of the plot."""

    cycle: int  # LR stage (steps) or long cycle (cosine); the fine-tune phase has the next number
    start: int
    end: int
    frames: int
    crop: int
    batch_size: int  # per device, at the long-cycle shape
    bn_splits: int  # sub-batch BN groups per device (1: plain or synchronised BN)
    bn_sync: int  # consecutive devices whose clips each BN normalises together (1: this device's alone)
    rate_min: int
    rate_max: int
    batch_factor: int  # B_rel
    decay: float  # step decay gamma^k (1 under cosine)
    lr_factor: float  # batch_factor × decay: the LR relative to the base LR, before cosine and warm-up
    short_cycle: tuple[tuple[int, int], ...]  # (crop, per-device batch) of successive iterations, cycling
    fine_tune: bool

    @property
    def shape(self) -> LongCycleShape:
        """The stage's long-cycle shape."""
        return LongCycleShape(self.frames, self.crop, self.batch_size, self.bn_splits, self.rate_min, self.rate_max,
                              self.bn_sync)

    @property
    def bn_mode(self) -> str:
        """The BN column of the table: the split count ("4", "1" for plain BN) or "sync×g" over g devices."""
        return f"sync×{self.bn_sync}" if self.bn_sync > 1 else str(self.bn_splits)


def bn_splits_for(batch_size: int, bn_base_size: int = 8) -> int:
    """Largest divisor of `batch_size` that is at most batch_size / bn_base_size (at least 1)."""
    k = max(1, batch_size // bn_base_size)
    while batch_size % k:
        k -= 1
    return k


def bn_sync_for(batch_size: int, world_size: int = 1, bn_base_size: int = 8) -> int:
    """Devices one BN synchronises over: the smallest divisor of world_size holding >= bn_base_size clips, else all."""
    if batch_size >= bn_base_size:
        return 1
    need = math.ceil(bn_base_size / batch_size)
    return next((g for g in range(need, world_size) if world_size % g == 0), world_size)


def count_batches(num_samples: int, batch_sizes: Sequence[int]) -> int:
    """Full batches taken in order from `num_samples` samples with cycling batch sizes (the last partial is dropped)."""
    full, rest = divmod(num_samples, sum(batch_sizes))
    count = full * len(batch_sizes)
    for size in batch_sizes:
        if rest < size:
            break
        rest -= size
        count += 1
    return count


def short_cycle_shapes(crop: int, base_crop: int) -> list[tuple[int, int]]:
    """(crop, batch multiplier) of the three short-cycle iterations at long-cycle crop `crop` (at S0/√2: 2×, 1×, 1×)."""
    shapes = [(round(f * base_crop), round((crop / (f * base_crop)) ** 2)) for f in SHORT_CYCLE_FACTORS]
    return [*shapes, (crop, 1)]


def mix_seeds(*values: int) -> int:
    """63-bit hash of integers (splitmix64 steps): nearby seeds, epochs or positions give unrelated streams."""
    h = 0
    for v in values:
        z = ((h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


def _round_ends(lengths: Sequence[float], total: float) -> list[int]:
    """Stage ends: lengths scaled to sum to `total`, cumulative sums rounded (equal neighbours: an empty stage)."""
    scale = total / sum(lengths)
    ends, cumulative = [], 0.0
    for i, length in enumerate(lengths):
        # The last end is `total` itself, so float error in the running sum cannot flip its rounding.
        cumulative = total if i == len(lengths) - 1 else cumulative + length * scale
        ends.append(round(cumulative))
    return ends


def _lengthen_empty(ends: Sequence[int]) -> list[int]:
    """Stage ends with one epoch inserted for every empty stage (every later end moves by the epochs inserted)."""
    out, previous, added = [], 0, 0
    for end in ends:
        added += end == previous
        previous = end
        out.append(end + added)
    return out


class MultigridSchedule:
    """Long-cycle shapes, short-cycle batches, BN modes and LR of a training run, as pure functions of the epoch.

    `epochs`, `steps` and `warmup_epochs` are in the base (fixed-shape) recipe's epochs; `num_epochs` is the stretched
    total actually trained. `steps`: epochs where the step policy decays the LR by `gamma` (a leading 0 is optional;
    ignored under cosine).
    `warmup_start_lr` defaults to lr / 10 (X3D: 0.01 for 0.1). With long_cycle and short_cycle off this is the
    plain fixed-shape recipe. `world_size` (the number of devices) only decides synchronised BN.
    """

    def __init__(self, epochs: int, base_batch: int, base_frames: int, base_crop: int, base_rate: int, lr: float,
                 lr_policy: str = "cosine", warmup_epochs: float = 0.0, warmup_start_lr: float | None = None,
                 steps: Sequence[int] | None = None, gamma: float = 0.1, long_cycle: bool = True,
                 short_cycle: bool = True, epoch_factor: float = 1.5, bn_base_size: int = 8,
                 cosine_cycles: int = 3, world_size: int = 1, min_frames: int = 1) -> None:
        self.epochs, self.lr, self.lr_policy, self.gamma = epochs, lr, lr_policy, gamma
        self.min_frames = min(min_frames, base_frames)
        self.base_batch, self.base_frames = base_batch, base_frames
        self.base_crop, self.base_rate = base_crop, base_rate
        self.long_cycle, self.short_cycle, self.bn_base_size = long_cycle, short_cycle, bn_base_size
        self.world_size = world_size
        self.epoch_factor = epoch_factor if (long_cycle or short_cycle) else 1.0
        self.warmup_start_lr = lr / 10 if warmup_start_lr is None else warmup_start_lr
        bounds = self._validate(steps, warmup_epochs, cosine_cycles)
        self.stages: list[Stage] = self._build_stages(bounds, cosine_cycles)
        self.num_epochs: int = self.stages[-1].end
        # Epochs beyond the stretched total that a too short cosine training adds so that every shape trains (else 0).
        self.added_epochs: int = self.num_epochs - self._stretched_epochs()
        self.warmup_epochs: float = warmup_epochs * self.num_epochs / epochs  # stretched like the rest
        self._ends = [s.end for s in self.stages]

    # ---- construction ----
    def _validate(self, steps: Sequence[int] | None, warmup_epochs: float, cosine_cycles: int) -> list[int]:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"multigrid.MultigridSchedule: {what}")

        need(self.lr_policy in ("cosine", "steps"), f"lr_policy must be 'cosine' or 'steps', got {self.lr_policy!r}")
        need(self.epochs >= 1 and self.lr > 0 and self.gamma > 0 and self.epoch_factor > 0,
             "epochs, lr, gamma and epoch_factor must be positive")
        need(min(self.base_batch, self.base_frames, self.base_rate, self.bn_base_size, cosine_cycles,
                 self.world_size, self.min_frames) >= 1 and self.base_crop >= 4,
             "base batch/frames/rate/crop, bn_base_size, cosine_cycles, world_size and min_frames must be positive")
        need(self._stretched_epochs() >= 1, f"epochs × epoch_factor = {self.epochs * self.epoch_factor:g} leaves no "
                                            "whole epoch to train")
        need(0 <= warmup_epochs < self.epochs, f"warmup_epochs must be in [0, epochs), got {warmup_epochs}")
        need(self.lr_policy == "cosine" or steps is not None, "lr_policy 'steps' needs steps (epochs where LR decays)")
        bounds = [0] + [int(s) for s in (steps or []) if s != 0]
        need(all(a < b for a, b in zip(bounds, bounds[1:])) and bounds[-1] < self.epochs,
             f"steps must increase and stay below epochs={self.epochs}, got {list(steps or [])}")
        need(not (self.long_cycle and self.lr_policy == "steps" and len(bounds) < 2),
             "the long cycle with lr_policy 'steps' needs at least one step after epoch 0 (one long cycle per stage)")
        return bounds

    def _stretched_epochs(self) -> int:
        """The total before any empty stage is lengthened: PySlowFast's rounding (int() for the short cycle alone)."""
        stretched = self.epochs * self.epoch_factor
        return round(stretched) if self.long_cycle else int(stretched)

    def _shape(self, frames: int, crop: int, cycle: int, start: int, end: int, decay: float, fine_tune: bool) -> Stage:
        batch_factor = round(self.base_frames * self.base_crop**2 / (frames * crop**2))
        batch = batch_factor * self.base_batch
        cycle_shapes = short_cycle_shapes(crop, self.base_crop) if self.short_cycle else [(crop, 1)]
        return Stage(cycle=cycle, start=start, end=end, frames=frames, crop=crop, batch_size=batch,
                     bn_splits=bn_splits_for(batch, self.bn_base_size),
                     bn_sync=bn_sync_for(batch, self.world_size, self.bn_base_size), rate_min=self.base_rate,
                     rate_max=self.base_rate * self.base_frames // frames, batch_factor=batch_factor, decay=decay,
                     lr_factor=batch_factor * decay, short_cycle=tuple((c, m * batch) for c, m in cycle_shapes),
                     fine_tune=fine_tune)

    def _long_cycle_shapes(self) -> list[tuple[int, int]]:
        return [(max(self.min_frames, round(self.base_frames * ft)), round(self.base_crop * fs))
                for ft, fs in LONG_CYCLE_FACTORS]

    def _mean_batch_factor(self, frames: int, crop: int) -> float:
        """PySlowFast's mean batch factor of a long-cycle shape over its short cycle (unrounded short crops)."""
        crops = [f * self.base_crop for f in SHORT_CYCLE_FACTORS] if self.short_cycle else []
        crops.append(crop)
        factors = [round(self.base_frames * self.base_crop**2 / (frames * c**2)) for c in crops]
        return sum(factors) / len(factors)

    def _build_stages(self, bounds: list[int], cosine_cycles: int) -> list[Stage]:
        if self.long_cycle and self.lr_policy == "steps":
            layout = self._long_cycle_layout(bounds)
            return self._long_cycle_stages(layout, self._round_layout(layout))  # empty stages are skipped
        if self.long_cycle:
            # Equal parts of the base recipe: `cycles` long cycles, then the fine-tune phase. The most cycles whose
            # every stage keeps an epoch; failing even one, each empty stage is given an epoch (the total grows).
            for cycles in range(cosine_cycles, 0, -1):
                layout = self._long_cycle_layout([self.epochs * j / (cycles + 1) for j in range(cycles + 1)])
                ends = self._round_layout(layout)
                if all(a < b for a, b in zip([0, *ends], ends)):
                    break
            return self._long_cycle_stages(layout, _lengthen_empty(ends))
        factor = self.epoch_factor
        starts = [int(b * factor) for b in bounds] if self.lr_policy == "steps" else [0]
        ends = starts[1:] + [int(self.epochs * factor)]
        stages = [self._shape(self.base_frames, self.base_crop, k, a, b, self._decay(k), False)
                  for k, (a, b) in enumerate(zip(starts, ends))]
        return [s for s in stages if s.end > s.start]  # epoch_factor < 1 can merge neighbouring steps

    def _decay(self, k: int) -> float:
        return self.gamma**k if self.lr_policy == "steps" else 1.0

    def _long_cycle_layout(self, bounds: Sequence[float]) -> list[tuple[int, int, float]]:
        """PySlowFast's layout, (stage, shape index, unscaled epochs): each stage split over the shapes for equal
        iterations, then the fine-tune phase at the base shape."""
        mean_bs = [self._mean_batch_factor(t, s) for t, s in self._long_cycle_shapes()]
        layout = []
        for k in range(len(bounds) - 1):
            layout += [(k, i, (bounds[k + 1] - bounds[k]) * b / sum(mean_bs)) for i, b in enumerate(mean_bs)]
        # The fine-tune phase saves iterations like the rest: the saving is the mean batch factor over the shapes.
        saving = sum(mean_bs) / len(mean_bs)
        layout.append((len(bounds) - 1, len(mean_bs) - 1, (self.epochs - bounds[-1]) / saving * mean_bs[-1]))
        return layout

    def _round_layout(self, layout: Sequence[tuple[int, int, float]]) -> list[int]:
        return _round_ends([length for _, _, length in layout], self.epochs * self.epoch_factor)

    def _long_cycle_stages(self, layout: Sequence[tuple[int, int, float]], ends: Sequence[int]) -> list[Stage]:
        """Stages of a layout ending at `ends`; a stage with no epochs (end = start) is left out."""
        shapes = self._long_cycle_shapes()
        last = layout[-1][0]  # the fine-tune phase's stage number
        stages, start = [], 0
        for (k, i, _), end in zip(layout, ends):
            fine_tune = k == last
            if fine_tune and self.lr_policy == "steps" and end - start >= 2:
                # PySlowFast keeps the last decay for the first half of the fine-tune phase.
                middle = (start + end) // 2
                stages.append(self._shape(*shapes[i], k, start, middle, self._decay(k - 1), True))
                start = middle
            if end > start:
                stages.append(self._shape(*shapes[i], k, start, end, self._decay(k), fine_tune))
            start = end
        return stages

    # ---- queries ----
    def stage_at(self, epoch: float) -> Stage:
        """The stage that holds (fractional) `epoch`; the last one past the end."""
        return self.stages[min(bisect.bisect_right(self._ends, epoch), len(self.stages) - 1)]

    def shape_at(self, epoch: int) -> LongCycleShape:
        """Long-cycle shape (frames, crop, per-device batch, BN splits, rate range) of `epoch`."""
        return self.stage_at(epoch).shape

    def _base_lr(self, epoch: float) -> float:
        """LR at the base shape (batch factor 1): cosine or step decay, without warm-up."""
        if self.lr_policy == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.num_epochs) / self.num_epochs))
        return self.lr * self.stage_at(epoch).decay

    def lr_at(self, epoch: float) -> float:
        """Learning rate at fractional epoch `epoch` (= epoch + iteration / iterations of that epoch)."""
        epoch = max(0.0, epoch)
        if epoch < self.warmup_epochs:
            end = self._base_lr(self.warmup_epochs)
            base = self.warmup_start_lr + (end - self.warmup_start_lr) * epoch / self.warmup_epochs
        else:
            base = self._base_lr(epoch)
        return self.stage_at(epoch).batch_factor * base

    def iterations(self, epoch: int, num_samples: int, world_size: int | None = None, short_cycle: bool = True) -> int:
        """Iterations of `epoch` over a dataset of `num_samples` split across `world_size` ranks (same on all;
        default: the schedule's)."""
        stage = self.stage_at(epoch)
        shapes = stage.short_cycle if short_cycle else ((stage.crop, stage.batch_size),)
        return count_batches(math.ceil(num_samples / (world_size or self.world_size)), [b for _, b in shapes])

    def table(self, num_samples: int | None = None, world_size: int | None = None) -> str:
        """The whole schedule as a printable table; with `num_samples`, iterations per epoch as well.

        The BN column is the sub-batch split count per device (1: plain BN) or sync×g, BN over g devices' clips.
        """
        mode = {(True, True): "long + short cycle", (True, False): "long cycle", (False, True): "short cycle",
                (False, False): "fixed shape"}[(self.long_cycle, self.short_cycle)]
        added = f", +{self.added_epochs} so that every shape trains at least one epoch" if self.added_epochs else ""
        lines = [f"Multigrid schedule: {mode}, {self.lr_policy} LR (base {self.lr:g}, warm-up "
                 f"{self.warmup_epochs:.3g} epochs), {self.num_epochs} epochs ({self.epochs} × {self.epoch_factor:g}"
                 f"{added})",
                 f"{'stage':>5}  {'epochs':>9}  {'T':>3}  {'crop':>4}  {'rate':>5}  {'batch':>5}  {'BN':>6}  "
                 f"{'LR':>17}  {'iters':>5}  short cycle (batch@crop)"]
        for s in self.stages:
            lr_end = self.lr_at(s.end - 1e-9)
            lr = f"{self.lr_at(s.start):.4g}" + (f" → {lr_end:.4g}" if not math.isclose(lr_end, self.lr_at(s.start))
                                                 else "")
            iters = self.iterations(s.start, num_samples, world_size) if num_samples else "-"
            cycle = " ".join(f"{b}@{c}" for c, b in s.short_cycle)
            lines.append(f"{'ft' if s.fine_tune else s.cycle:>5}  {f'{s.start}-{s.end}':>9}  {s.frames:>3}  "
                         f"{s.crop:>4}  {f'{s.rate_min}-{s.rate_max}':>5}  {s.batch_size:>5}  {s.bn_mode:>6}  "
                         f"{lr:>17}  {iters:>5}  {cycle}")
        return "\n".join(lines)


class ShortCycleBatchSampler(Sampler[list[ClipSpec]]):
    """Batches of ClipSpecs for one rank, deterministic from (seed, epoch), the same shapes and count on every rank.

    A permutation of the dataset drawn from (seed, epoch) is padded by repetition to a multiple of `world_size` and
    dealt out like DistributedSampler (rank r takes positions r, r + world, ...). Each rank consumes its list in order
    with the short cycle's batch sizes and drops the last partial batch, so every batch has the exact size the BN split
    count expects. A sample's seed comes from (seed, epoch, position in the padded permutation), independent of the
    loader worker. `start_iter` skips batches already trained: the rest equals the tail of an uninterrupted epoch.
    With `end_epoch` the batches of the following epochs up to it come next, in one stream: a DataLoader over it keeps
    its workers and prefetches across epoch ends (a small data set's epoch is only a few large batches long).
    `len()` is the number of batches still to yield. `short_cycle=False` gives plain batches at the long-cycle shape
    (precise BN).
    """

    def __init__(self, num_samples: int, schedule: MultigridSchedule, *, epoch: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, start_iter: int = 0, short_cycle: bool = True,
                 end_epoch: int | None = None) -> None:
        super().__init__()
        if num_samples < 1 or not 0 <= rank < world_size:
            raise ValueError(f"multigrid.ShortCycleBatchSampler: need num_samples >= 1 and 0 <= rank < world_size, "
                             f"got num_samples={num_samples}, rank={rank}, world_size={world_size}")
        self.num_samples, self.schedule, self.rank, self.world_size = num_samples, schedule, rank, world_size
        self.seed, self.short_cycle = seed, short_cycle
        self.per_rank = math.ceil(num_samples / world_size)
        self.set_epoch(epoch, start_iter, end_epoch)

    def set_epoch(self, epoch: int, start_iter: int = 0, end_epoch: int | None = None) -> None:
        """Start at `epoch` (skipping its first `start_iter` batches) and go on to `end_epoch` (default: epoch + 1)."""
        end_epoch = epoch + 1 if end_epoch is None else end_epoch
        if not 0 <= start_iter <= self.batches_in(epoch):
            raise ValueError(f"multigrid.ShortCycleBatchSampler: start_iter {start_iter} is outside the "
                             f"{self.batches_in(epoch)} batches of epoch {epoch}")
        self.epoch, self.start_iter, self.end_epoch = epoch, start_iter, end_epoch

    def _shapes(self, epoch: int) -> tuple[tuple[int, int], ...]:
        stage = self.schedule.stage_at(epoch)
        return stage.short_cycle if self.short_cycle else ((stage.crop, stage.batch_size),)

    def batches_in(self, epoch: int) -> int:
        """Batches of a whole epoch on each rank."""
        return count_batches(self.per_rank, [b for _, b in self._shapes(epoch)])

    def __len__(self) -> int:
        return max(sum(self.batches_in(e) for e in range(self.epoch, self.end_epoch)) - self.start_iter, 0)

    def __iter__(self) -> Iterator[list[ClipSpec]]:
        for epoch in range(self.epoch, self.end_epoch):
            yield from self._epoch(epoch, self.start_iter if epoch == self.epoch else 0)

    def _epoch(self, epoch: int, start_iter: int) -> Iterator[list[ClipSpec]]:
        generator = torch.Generator().manual_seed(mix_seeds(self.seed, epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        shapes, shape = self._shapes(epoch), self.schedule.shape_at(epoch)
        sizes = [b for _, b in shapes]
        full, part = divmod(start_iter, len(sizes))
        j = full * sum(sizes) + sum(sizes[:part])  # samples of this rank already consumed
        for it in range(start_iter, self.batches_in(epoch)):
            crop, size = shapes[it % len(shapes)]
            # Global positions in the padded permutation; padding wraps around (duplicates clips across ranks).
            positions = [self.rank + (j + i) * self.world_size for i in range(size)]
            yield [ClipSpec(order[p % self.num_samples], shape.frames, crop, shape.rate_min, shape.rate_max,
                            mix_seeds(self.seed, epoch, p)) for p in positions]
            j += size
