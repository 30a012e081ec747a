"""The training engine the three recipes share: one epoch of SGD, multi-view prediction, precise BN, and the run
around them (start, resume, the epoch loop with its evaluations and checkpoints, the final test).

A recipe (train_*.py) describes its task in a `Task` (loss, evaluation and its best metric, result line, optionally
an LR factor from the validation results) and builds its datasets and model; `fit` and `test` do the rest the same
way for all. Checkpoints hold plain data only: weights, optimizer, epoch and iteration, the partial sums of a
mid-epoch stop (so a resumed epoch reports the whole epoch), the validation results so far, flags and model config.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import depthwise_conv
import utils
from checkpoints import convert_checkpoint, finetune_summary, load_finetune, load_named_weights
from multigrid import MultigridSchedule, ShortCycleBatchSampler, mix_seeds
from utils import Interrupted, get_rank, get_world_size, is_main_process
from x3d import SubBatchNorm3d, build_model, default_input, fold_batchnorm, set_bn_splits, to_channels_last

BN_STAT_SUFFIXES = ("running_mean", "running_var")
FEW_ITERATIONS = 10  # fewer steps than this per epoch at a shape: BN statistics and the LR curve get coarse


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when any rank's loss is NaN or infinite."""


class TrainingStopped(Interrupted):
    """Raised on every rank when a stop was requested on any rank (Ctrl-C); `iteration` steps of `epoch` (0-based)
    are done; the message counts epochs from 1, as the progress bar."""

    def __init__(self, epoch: int, iteration: int, saved: bool, num_epochs: int | None = None) -> None:
        super().__init__(f"Ctrl-C: stopped at epoch {epoch + 1}" + (f"/{num_epochs}" if num_epochs else "")
                         + f", iteration {iteration}" + (" and saved a checkpoint there" if saved else ""))
        self.epoch, self.iteration = epoch, iteration


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD with Nesterov momentum; no weight decay on BN parameters and biases (all 1-D tensors).

    Its step is PyTorch's fused kernel on CPU and CUDA tensors (`fused=True`): one call for all parameters instead of
    a loop over X3D's hundreds of small tensors (benchmarks/README.md). `restore` keeps that choice when it loads a
    checkpoint's optimizer state, which carries the choice of the run that wrote it.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay) or None
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, fused=fused)


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (bf16 autocast was measured slower than fp32 on CPU)."""
    enabled = device.type == "cuda" and amp != "none"
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def to_device(clips: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a (N, C, T, H, W) batch to the device in channels_last_3d, the fast layout for depthwise Conv3d."""
    return clips.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last_3d)


def iteration_seed(seed: int, epoch: int, iteration: int, rank: int = 0) -> int:
    """Seed for the global RNG (dropout) at one iteration of one rank, so a resumed run repeats the same random draws
    and the ranks draw different ones, as one process would for the whole batch. Any --seed fits (a 63-bit hash)."""
    return mix_seeds(seed, epoch, iteration, rank)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
def new_meters() -> dict:
    """Running sums of an epoch: plain data, so a mid-epoch checkpoint can hold them and a resumed epoch go on."""
    return {"loss": 0.0, "top1": 0.0, "top1_clips": 0, "clips": 0, "iters": 0, "wait": 0.0, "seconds": 0.0,
            "shapes": {}}


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    criterion: Callable,
    *,
    epoch: int,
    num_iters: int,
    lr_at: Callable[[float], float],
    device: torch.device,
    seed: int,
    start_iter: int = 0,
    num_epochs: int | None = None,
    meters: dict | None = None,
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    save_fn: Callable[[int, dict], None] | None = None,
    save_every: int = 0,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """One pass over `loader` (which already skips the first `start_iter` batches when resuming); returns averages,
    and under "shapes" the seconds, iterations and data wait of each batch shape (`batch x frames x crop`), the
    short cycle's included, so that the cost of an iteration can be compared across multigrid's shapes.

    `meters`: the sums of the iterations before `start_iter` (a mid-epoch checkpoint's), so that the averages cover the
    whole epoch; `save_fn(iteration, meters)` writes a checkpoint holding them. Top-1 is counted for single-label
    (integer) targets only.
    """
    model.train()
    meters = copy.deepcopy(meters) if meters else new_meters()
    shapes = meters["shapes"]
    done_before = meters["seconds"]  # seconds of this epoch before a resume
    label = f"epoch {epoch + 1}" + (f"/{num_epochs}" if num_epochs else "")  # 1-based, as the epoch summary
    bar = tqdm(total=num_iters, initial=start_iter, disable=not (progress and is_main_process()), desc=label,
               dynamic_ncols=True, leave=False)
    start = tick = time.perf_counter()

    def snapshot() -> dict:
        meters["seconds"] = done_before + time.perf_counter() - start
        return copy.deepcopy(meters)

    for it, (clips, targets) in enumerate(loader, start=start_iter):
        wait = time.perf_counter() - tick  # time spent waiting for the data loader
        meters["wait"] += wait
        lr = lr_at(epoch + it / num_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(iteration_seed(seed, epoch, it, get_rank()))
        clips, targets = to_device(clips, device), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(clips)
            loss = criterion(logits.float(), targets)

        total_loss, stop = _agree(loss, should_stop)
        if not math.isfinite(total_loss):
            where = f" on at least one of {get_world_size()} processes" if get_world_size() > 1 else ""
            raise NonFiniteLossError(f"non-finite loss ({total_loss}){where} at {label}, iteration {it} "
                                     f"(lr {lr:.4g}); stopping. The last checkpoint written is kept.")
        _update(model, loss, optimizer, scaler, clip_grad)

        n = clips.shape[0]
        meters["loss"] += loss.item() * n
        # on a GPU the update may still be running here: its time then counts towards the next iteration's shape
        key = f"{n}x{clips.shape[2]}x{clips.shape[3]}"  # batch x frames x crop
        shape = shapes.setdefault(key, {"seconds": 0.0, "iters": 0, "wait": 0.0})
        shape["seconds"] += time.perf_counter() - tick
        shape["iters"] += 1
        shape["wait"] += wait
        meters["clips"] += n
        meters["iters"] += 1
        if targets.dtype == torch.long:  # single-label task: report batch top-1
            meters["top1"] += (logits.argmax(1) == targets).sum().item()
            meters["top1_clips"] += n
        elapsed = done_before + time.perf_counter() - start
        top1 = {"top1": f"{100 * meters['top1'] / meters['top1_clips']:.1f}"} if meters["top1_clips"] else {}
        bar.set_postfix(loss=f"{loss.item():.3f}", **top1, lr=f"{lr:.3g}", shape=key,
                        clips_s=f"{meters['clips'] / elapsed:.1f}", wait=f"{100 * meters['wait'] / elapsed:.0f}%")
        bar.update(1)
        # A stop finishes this step (its forward has already moved the BN statistics), saves the state after it and
        # leaves; on the epoch's last step the epoch ends first (evaluation, epoch checkpoint) and the next step stops.
        if stop and it + 1 < num_iters:
            bar.close()
            if save_fn is not None:
                save_fn(it + 1, snapshot())
            if get_world_size() > 1:
                dist.barrier()  # the launcher ends every worker once one exits: let rank 0 finish writing first
            raise TrainingStopped(epoch, it + 1, saved=save_fn is not None, num_epochs=num_epochs)
        if save_fn is not None and save_every and (it + 1) % save_every == 0 and it + 1 < num_iters:
            save_fn(it + 1, snapshot())
        tick = time.perf_counter()
    bar.close()
    elapsed = snapshot()["seconds"]
    clips_seen = max(meters["clips"], 1)
    top1 = {"top1": 100 * meters["top1"] / meters["top1_clips"]} if meters["top1_clips"] else {}
    return {
        "loss": meters["loss"] / clips_seen,
        **top1,
        "lr": lr_at(epoch + 1 - 1e-9),
        "clips_per_s": meters["clips"] / max(elapsed, 1e-9),
        "data_wait": meters["wait"] / max(elapsed, 1e-9),
        "seconds": elapsed,
        "iters": meters["iters"],
        "shapes": shapes,
    }


def _agree(loss: torch.Tensor, should_stop: Callable[[], bool] | None) -> tuple[float, bool]:
    """(the loss summed over ranks, whether any rank asked to stop), in one all-reduce before the update.

    Every rank must stop together, or the others hang in the next all-reduce: the loss check and a stop request
    (Ctrl-C on any rank, `should_stop`) travel together. CPU-GPU sync point.
    """
    stop = float(should_stop is not None and should_stop())
    check = torch.stack([loss.detach().float(), torch.tensor(stop, device=loss.device)])
    if get_world_size() > 1:
        dist.all_reduce(check)
    total_loss, stops = check.tolist()
    return total_loss, stops > 0


def _update(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, clip_grad: float | None) -> None:
    """Backward and one optimizer step (through the fp16 loss scaler when there is one), gradients clipped if asked."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: per-view scores reduced to per-video scores, summed across ranks
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_videos(
    model: nn.Module,
    loader: Iterable,
    num_videos: int,
    num_classes: int,
    device: torch.device,
    *,
    activation: str = "softmax",
    reduce: str = "mean",
    amp: str = "none",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score every video from its views: returns (scores (V, K), targets (V, ...), views seen per video (V,)).

    Each view's logits go through `activation` ("softmax", "sigmoid" or "none": the logits themselves) and are then
    averaged (`reduce` "mean") or maxed ("max", -inf for a video without views) over the video's views.

    `loader` yields (clips, targets, video_index, view_index) and must give each view to exactly one rank (no
    padding), so summing across ranks counts every view once, whatever the number of processes. Views marked with
    view index -1 (the video failed to decode) are not scored; their video's count stays below the number of views.
    """
    model.eval()
    model = fold_batchnorm(model)  # an eval-mode copy: BN folded into the convolutions, the same outputs
    scores = torch.zeros(num_videos, num_classes, dtype=torch.float64)
    if reduce == "max":
        scores.fill_(-math.inf)
    counts = torch.zeros(num_videos, dtype=torch.float64)
    targets_out = None
    bar = tqdm(loader, disable=not (progress and is_main_process()), desc="eval", dynamic_ncols=True, leave=False)
    for clips, targets, video_index, view_index in bar:
        if targets_out is None:
            targets_out = torch.full((num_videos, *targets.shape[1:]), -1, dtype=torch.float64)
        targets_out[video_index] = targets.double()
        keep = view_index >= 0  # the dataset marks views of a video that failed to decode with -1
        if not keep.any():
            continue
        clips, video_index = clips[keep], video_index[keep]
        with autocast(device, amp), torch.inference_mode():
            logits = model(to_device(clips, device)).float().cpu()
        if activation != "none":
            logits = logits.softmax(1) if activation == "softmax" else logits.sigmoid()
        if reduce == "max":
            for video, row in zip(video_index.tolist(), logits.double()):  # (index_reduce_ "amax" is a beta API)
                torch.maximum(scores[video], row, out=scores[video])
        else:
            scores.index_add_(0, video_index, logits.double())
        counts.index_add_(0, video_index, torch.ones(len(video_index), dtype=torch.float64))
    if targets_out is None:  # this rank received no views
        targets_out = torch.full((num_videos,), -1, dtype=torch.float64)
    if get_world_size() > 1:
        dist.all_reduce(scores, op=dist.ReduceOp.MAX if reduce == "max" else dist.ReduceOp.SUM)
        dist.all_reduce(counts)
        dist.all_reduce(targets_out, op=dist.ReduceOp.MAX)  # -1 where a rank did not see the video
    if reduce == "mean":
        scores /= counts.clamp(min=1).unsqueeze(1)
    return scores.float(), targets_out, counts


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percentage of rows whose label is among the k highest scores."""
    top = scores.topk(max(ks), dim=1).indices
    hits = top == labels.long().unsqueeze(1)
    return {k: 100.0 * hits[:, :k].any(1).float().mean().item() for k in ks}


def per_class_top1(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[int, float]:
    """Top-1 accuracy (%) of each class that has at least one video, keyed by class index."""
    labels = labels.long()
    hits = scores.argmax(1) == labels
    return {k: 100.0 * hits[labels == k].float().mean().item() for k in range(num_classes) if (labels == k).any()}


# ----------------------------------------------------------------------------------------------------------------------
# Precise BN: population statistics at the current shape before evaluating
# ----------------------------------------------------------------------------------------------------------------------
def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


@torch.no_grad()
def precise_bn(model: nn.Module, loader: Iterable, num_batches: int, device: torch.device, amp: str = "none") -> int:
    """Recompute BN statistics as the true average over `num_batches` training batches (momentum=None).

    Running averages with momentum 0.1 lag behind the weights; multigrid also changes the shape under them. Returns the
    number of batches used. Statistics are then averaged across ranks so every process evaluates the same model.
    """
    layers = _bn_layers(model)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches seen
    model.train()
    used = 0
    for clips, _targets in loader:
        if used == num_batches:
            break
        with autocast(device, amp):
            model(to_device(clips, device))
        used += 1
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.eval()  # aggregates sub-batch statistics into the plain BN buffers
    sync_bn_stats(model)
    return used


@torch.no_grad()
def sync_bn_stats(model: nn.Module) -> None:
    """Combine each rank's BN statistics (ranks as groups: law of total variance) so all ranks hold the same.

    DDP leaves BN buffers alone (`fit`), so each rank's running statistics follow its own batches. Every rank calls
    this at the same points: after precise BN, before every evaluation and before every checkpoint, so that the ranks
    evaluate one model and a resumed run starts every rank from what the uninterrupted one held there. Sub-batch BN's
    group statistics are folded in first and restart from the combined ones.
    """
    world = get_world_size()
    layers = [m for m in _bn_layers(model) if m.running_mean is not None]
    if world == 1 or not layers:
        return
    for m in layers:
        if isinstance(m, SubBatchNorm3d):
            m.aggregate_stats()
    # One all-reduce for every layer: each layer's means, then its E[x²].
    stats = torch.cat([t for m in layers for t in (m.running_mean, m.running_var + m.running_mean.square())])
    dist.all_reduce(stats)
    stats /= world
    offset = 0
    for m in layers:
        c = m.running_mean.numel()
        mean, second = stats[offset : offset + c], stats[offset + c : offset + 2 * c]
        m.running_mean.copy_(mean)
        m.running_var.copy_(second - mean.square())
        offset += 2 * c
        if isinstance(m, SubBatchNorm3d):
            m.tile_running_stats()



# ----------------------------------------------------------------------------------------------------------------------
# Runs: what the main() of every recipe does around the loops above. These take the recipe's parsed flags (the
# shared groups of utils.py); the Task says what is particular to the recipe.
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """What a recipe trains for; the engine does everything else the same way for every recipe.

    loss(logits, targets): the training loss of a batch. evaluate(model, dataset, prefix): the metrics of an evaluation
    under keys `<prefix>_...` ("val" during training, "test" at the end), equal on every rank and independent of their
    number. metric: the key, without prefix, whose maximum is the best model ("top1", "map"). result_line(stats,
    prefix): the line that reports an evaluation. lr_scale(evaluations): a factor on the schedule's LR computed from
    the validation results so far (the plateau policy), or None.
    """

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module, Any, str], dict]
    metric: str
    result_line: Callable[[dict, str], str]
    lr_scale: Callable[[list[dict]], float] | None = None


def plateau_scale(losses: Sequence[float], patience: int = 2, factor: float = 0.1, threshold: float = 1e-4) -> float:
    """The LR factor that PyTorch's ReduceLROnPlateau (mode min, relative threshold, no cooldown) has reached after
    these validation losses: ×factor whenever more than `patience` evaluations in a row bring no loss below the best
    × (1 - threshold). A pure function of the losses, which checkpoints keep, so a resumed run recomputes it."""
    best, bad, scale = math.inf, 0, 1.0
    for loss in losses:
        if loss < best * (1 - threshold):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > patience:
            scale, bad = scale * factor, 0
    return scale


def plateau_policy(args: argparse.Namespace) -> Callable[[list[dict]], float] | None:
    """Task.lr_scale for --lr-policy plateau (None for the other policies), announced once on rank 0."""
    if args.lr_policy != "plateau":
        return None
    if is_main_process() and not args.eval:
        print(f"LR policy plateau: the schedule's LR, divided by 10 whenever {args.patience + 1} evaluations in a row "
              "bring no lower val_loss")
    return lambda evaluations: plateau_scale([e["val_loss"] for e in evaluations], args.patience)


def start(args: argparse.Namespace, run_dir: Path) -> tuple[torch.device, utils.RunLogger]:
    """Join the processes, say where training runs, move the folder's files aside for --restart, seed everything."""
    device = utils.init_distributed(args.device)
    torch.backends.cudnn.benchmark = True  # shapes repeat within each long-cycle stage
    if is_main_process():
        print(utils.describe_device(device))
    if args.restart:  # rank 0 moves the files before any rank looks for a checkpoint
        if is_main_process():
            moved = utils.start_over(run_dir)
            print(f"--restart: the previous run's files are moved to {moved}" if moved else
                  f"--restart: {run_dir} holds no previous run")
        if get_world_size() > 1:
            dist.barrier()
    log = utils.RunLogger(run_dir, tensorboard=args.tensorboard)
    utils.seed_everything(args.seed)
    return device, log


def starting_point(args: argparse.Namespace, run_dir: Path) -> tuple[dict | None, Path | None]:
    """(checkpoint, its file): with --eval the weights to evaluate (any supported format, converted); else the run's
    own checkpoint to resume (--resume or the folder's latest), refused if trained with other run-shaping flags;
    else (None, None), from scratch."""
    if args.eval:
        path = Path(args.resume or run_dir / "checkpoint.pt")
        state, notes = convert_checkpoint(path)
        if is_main_process():
            print(notes[0])
        return state, path
    found = utils.load_run_checkpoint(run_dir, args.resume)
    if found is None:
        return None, None
    if not {"model", "epoch"} <= found[0].keys():
        raise utils.CheckpointError(
            f"{found[1]}: not a training checkpoint of this project (it has no training state to resume); to train "
            f"from its weights pass it to --finetune, to evaluate it use --eval --resume")
    if isinstance(found[0].get("args"), dict):
        utils.check_same_run(args, found[0]["args"], found[1])
    return found


def resolve_input(args: argparse.Namespace, state: dict | None, recipe_input: dict | None = None) -> dict:
    """The clip input: the variant's default, then the recipe's (`recipe_input`), then the one the checkpoint was
    trained on, then the flags given."""
    cfg = (state or {}).get("model_cfg") or {}
    spec = {**default_input(cfg.get("name", args.model)), **(recipe_input or {})}
    if (state or {}).get("converted_from", {}).get("format", "project") == "project":  # external files record none
        spec.update({key: cfg[key] for key in spec if key in cfg})
    return utils.input_spec(args, spec)


def make_model(args: argparse.Namespace, spec: dict, num_classes: int, head: str, state: dict | None,
               device: torch.device) -> nn.Module:
    """The recipe's X3D on `device` in channels_last_3d: the checkpoint's variant (else --model), `num_classes`
    outputs, the `head` the task needs ("clip" or "frame"), recording the input `spec` it trains on. --eval loads the
    checkpoint's weights; --finetune (when not resuming) all but a classifier of another size, saying what it left
    out. A resumed run's weights are restored by `fit`, with the optimizer."""
    cfg = state.get("model_cfg") if state else None
    if cfg and cfg.get("num_classes", num_classes) != num_classes:
        raise utils.UserError(f"the checkpoint has {cfg['num_classes']} classes but {args.data_root} has "
                              f"{num_classes}; use --finetune to start from weights of another class count")
    model = build_model(cfg["name"] if cfg else args.model, num_classes=num_classes, dropout=args.dropout, head=head)
    model.cfg = dataclasses.replace(model.cfg, **spec)  # checkpoints record the input actually trained on
    if args.eval:
        model.load_state_dict(state["model"])  # the clip and per-frame heads have the same weights
    elif args.finetune and state is None:
        weights, named = load_named_weights(args.finetune)
        report = load_finetune(model, weights, args.finetune)
        if is_main_process():
            print(finetune_summary(report))
            if named is not None and named != model.cfg.name:  # XS, S and M weights have the same shapes
                print(f"warning: {args.finetune} holds {named} weights; they are fine-tuned as {model.cfg.name} "
                      f"(--model), at its input size", file=sys.stderr)
    return to_channels_last(model.to(device))


def build_schedule(args: argparse.Namespace, spec: dict, world_size: int, default_lr: float) -> MultigridSchedule:
    """The multigrid (or fixed-shape) schedule: shapes, batch sizes, BN splits and LR per fractional epoch. The plateau
    policy is a constant LR here, which its Task.lr_scale divides during training."""
    policy, steps = ("steps", []) if args.lr_policy == "plateau" else (args.lr_policy, args.steps)
    return MultigridSchedule(
        epochs=args.epochs, base_batch=args.batch_size, base_frames=spec["frames"], base_crop=spec["train_crop"],
        base_rate=spec["sampling_rate"], lr=args.lr if args.lr is not None else default_lr, lr_policy=policy,
        warmup_epochs=args.warmup_epochs, steps=steps, long_cycle=args.multigrid in ("both", "long"),
        short_cycle=args.multigrid in ("both", "short"), epoch_factor=args.epoch_factor, world_size=world_size,
        min_frames=args.min_frames)


def finished_run(state: dict | None, schedule: MultigridSchedule, run_dir: Path, task: Task,
                 test: bool) -> dict | None:
    """The stored test result of a run whose training is over, if its test was run or `test` is not wanted ({}),
    after saying so; None while training or the test is left to do."""
    if state is None or int(state.get("epoch", 0)) < schedule.num_epochs or state.get("pending_evaluation"):
        return None
    records = utils.read_log(run_dir / "log.jsonl")
    tested = [r for r in records if f"test_{task.metric}" in r]
    stored = tested[-1] if tested else None if test else {}
    if stored is not None and is_main_process():  # trained and tested: say so instead of appending another test
        print(f"{run_dir}: this run is finished ({schedule.num_epochs} epochs)"
              + (f"; its {task.result_line(stored, 'test')}" if stored else "")
              + ". Pass --eval to evaluate it again, or --restart to train it again.")
    return stored


def check_iterations(schedule: MultigridSchedule, num_samples: int, world: int, batch_size: int) -> list[str]:
    """Refuse a schedule where a shape would take no step per epoch; warnings for shapes with very few steps.

    Incomplete batches are dropped (BN splits need exact sizes), so a shape whose first, largest short-cycle batch
    exceeds the videos per process would train nothing at all and the run would end at chance.
    """
    per_rank = math.ceil(num_samples / world)
    iters = {s: schedule.iterations(s.start, num_samples, world) for s in schedule.stages}
    need = max(s.short_cycle[0][1] for s in schedule.stages)  # an epoch's first batch: the short cycle's largest
    if min(iters.values()) == 0:
        fits = batch_size * per_rank // need  # every batch scales with --batch-size
        fix = (f"use --batch-size {fits} or less" if fits >= 1 else
               "use --multigrid none, more training videos or fewer processes")
        raise utils.UserError(
            f"{num_samples} training videos are {per_rank} per process ({world} process{'es' if world > 1 else ''}), "
            f"fewer than the largest batch of the schedule, {need} clips (--batch-size {batch_size} × "
            f"{need // batch_size} at the coarsest multigrid shape, short cycle included): epochs at that shape would "
            f"take no training step (incomplete batches are dropped). To fix it, {fix}.")
    few = sorted({(s.frames, s.crop, n) for s, n in iters.items() if n < FEW_ITERATIONS})
    return [f"warning: only {n} training step{'s' if n > 1 else ''} per epoch at shape {t}x{c} (fewer than "
            f"{FEW_ITERATIONS}); a smaller --batch-size or more data gives more" for t, c, n in few]


def check_failures(dataset: Any, device: torch.device) -> int:
    """Videos that failed to decode on any rank; every rank stops together past --max-failure-fraction."""
    return dataset.failures.check(utils.any_rank(dataset.failures.failed, device))


def describe_data(**datasets: Any) -> None:
    """One line per dataset at the start of a run (videos, classes, the listed videos missing on disk), after checking
    that every rank found the same videos. Collective.

    Each rank indexes the data itself; a machine that lacks some files (a local copy of the data) would number the
    videos differently, train on other samples and, with fewer batches, hang the others.
    """
    for name, dataset in datasets.items():
        names = "\n".join(os.path.basename(p) for p in dataset.paths).encode()
        if not utils.same_on_all_ranks([len(dataset.paths), int.from_bytes(hashlib.blake2b(names, digest_size=7)
                                                                           .digest(), "big")]):
            raise utils.UserError(
                f"the processes found different {name} videos (rank {utils.get_rank()}: {len(dataset.paths)}, "
                f"{len(dataset.missing)} listed but missing): every machine must see the same data")
    if is_main_process():
        for name, dataset in datasets.items():
            print(f"{name} set: {dataset.summary()}")


def rank_views(num_views: int, views_per_video: int = 1) -> range:
    """This rank's share of an evaluation's views: whole videos, a contiguous block of them per rank.

    Each view goes to exactly one rank (no padding), so results do not depend on the number of processes; and a
    video's views stay together, so that one rank decodes each video, once for all of its views (video_dataset keeps
    a video's decoded windows for its next views).
    """
    videos, rank, world = num_views // views_per_video, utils.get_rank(), get_world_size()
    return range(videos * rank // world * views_per_video, videos * (rank + 1) // world * views_per_video)


def eval_loader(dataset: Any, args: argparse.Namespace, batch_size: int | None = None) -> DataLoader:
    """The evaluation views of this rank (`rank_views`), in order: in batches of `batch_size` views, or by default of
    whole videos, as many as --batch-size holds (at least one).

    A loader's workers take batches in turn, and each keeps the decoded windows of the video it read last: a video
    whose views were spread over several batches would be decoded by several workers."""
    views = getattr(dataset, "views_per_video", 1)
    share = rank_views(len(dataset), views)
    size = batch_size or max(1, args.batch_size // views) * views
    batches = [share[i : i + size] for i in range(0, len(share), size)]
    return DataLoader(dataset, batch_sampler=batches, num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=utils.init_loader_worker)


def train_loader(dataset: Any, schedule: MultigridSchedule, epoch: int, args: argparse.Namespace, start_iter: int = 0,
                 short_cycle: bool = True, end_epoch: int | None = None) -> DataLoader:
    """Batches from `epoch` (after `start_iter`) to `end_epoch`; the batch sampler picks shapes per iteration.

    One loader for all remaining epochs keeps its workers, which prefetch the next epoch's first batches while the
    current epoch ends, evaluates and saves: with a small data set and multigrid's large batches an epoch is only a
    few iterations long, and a fresh loader per epoch would make the loop wait for its first batch every time.
    """
    sampler = ShortCycleBatchSampler(len(dataset), schedule, epoch=epoch, rank=utils.get_rank(),
                                     world_size=get_world_size(), seed=args.seed, start_iter=start_iter,
                                     short_cycle=short_cycle, end_epoch=end_epoch)
    # A private generator keeps loader start-up from consuming the global RNG (dropout draws are seeded per step).
    return DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(args.seed + epoch),
                      worker_init_fn=utils.init_loader_worker)


def compile_for(net: nn.Module, schedule: MultigridSchedule, backend: str) -> nn.Module:
    """`net` through torch.compile, with room for one graph per batch shape and BN split count of the schedule.

    Multigrid changes the batch, frames and crop from stage to stage and within the short cycle; each combination is
    compiled once, at its first step, and reused whenever it comes back. Static shapes: dynamic ones were measured
    slower to compile and to run, and compiled again at the next shape anyway (benchmarks/README.md). The model itself
    stays uncompiled (checkpoints, precise BN and evaluation use it).
    """
    shapes = {(crop, batch, stage.frames, stage.bn_splits, stage.bn_sync)
              for stage in schedule.stages for crop, batch in stage.short_cycle}
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(shapes) + 1)
    return torch.compile(net, backend=backend, dynamic=False)


def restore(state: dict | None, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None) -> tuple[int, int, dict | None, list[dict]]:
    """Load a run checkpoint's training state: (epoch, iteration within it, that epoch's partial sums, the
    evaluations so far); (0, 0, None, []) without one."""
    if state is None:
        return 0, 0, None, []
    model.load_state_dict(state["model"])
    depthwise_conv.load_choices(state.get("depthwise_backward"))  # compute the gradients as the run did
    if "optimizer" in state:
        kernels = [(group["foreach"], group["fused"]) for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, (foreach, fused) in zip(optimizer.param_groups, kernels):  # this run's kernels, not the writer's
            group["foreach"], group["fused"] = foreach, fused
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return (int(state.get("epoch", 0)), int(state.get("iteration", 0)), state.get("epoch_meters"),
            list(state.get("evaluations", [])))


def check_resumable(state: dict, source: Path | None, iteration: int, world: int, num_samples: int) -> None:
    """Refuse a resume that cannot continue the run where it stopped; warn where it continues differently.

    Every rank must resume from the same point (each loads the checkpoint on its own: a run folder on storage that
    only some machines see would part them). An epoch's batches depend on the number of processes and of training
    videos, so a checkpoint taken mid-epoch resumes only with the same ones; at an epoch's end another number of
    processes (which scales the default LR) or of videos only changes the rest of the run.
    """
    epoch = int(state.get("epoch", 0))
    if not utils.same_on_all_ranks([epoch, iteration]):
        raise utils.CheckpointError(
            f"the processes loaded different checkpoints ({source} on rank {utils.get_rank()} is at epoch "
            f"{epoch + 1}, iteration {iteration}): is the run folder on storage every machine sees?")
    changes = [f"{what} {now} (the checkpoint has {saved})" for what, now, saved in (
        ("processes", world, state.get("world_size", world)),
        ("training videos", num_samples, state.get("num_train_samples", num_samples))) if now != saved]
    if changes and iteration > 0:
        raise utils.CheckpointError(
            f"{source} was saved mid-epoch (epoch {epoch + 1}, iteration {iteration}) and this run has "
            f"{', '.join(changes)}: the epoch's batches would differ. Resume with the run's own processes and data, or "
            f"from the end of an epoch")
    if changes and is_main_process():
        print(f"warning: resuming {source} with {', '.join(changes)}: the batches per step "
              f"{'and the default LR ' if world != state.get('world_size', world) else ''}differ from here on",
              file=sys.stderr)


def fit(model: nn.Module, task: Task, schedule: MultigridSchedule, train_set: Any, val_set: Any,
        args: argparse.Namespace, device: torch.device, run_dir: Path, log: utils.RunLogger,
        resume: tuple[dict | None, Path | None], extras: dict) -> dict:
    """Train `model` to the end of `schedule` from `resume` (the run's checkpoint and its file; (None, None): from the
    start); returns the last epoch's stats.

    Evaluates on `val_set` every --eval-every epochs and after the last, saves after every epoch and every
    --save-every iterations (with `extras`, e.g. the class names), logs and prints one line per epoch; Ctrl-C saves
    and raises TrainingStopped.
    """
    rank0, world = is_main_process(), get_world_size()
    warnings = check_iterations(schedule, len(train_set), world, args.batch_size)
    # Sub-batch BN keeps per-rank statistics (synchronised before every evaluation and checkpoint: sync_bn_stats), so
    # buffers are not synchronised in forward; at the start they are the same on every rank (same initialisation or
    # checkpoint).
    net = DistributedDataParallel(model, forward_sync_buffers=False) if world > 1 else model
    if args.compile:
        net = compile_for(net, schedule, args.compile)
    optimizer = build_optimizer(model, lr=0.0, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and args.amp == "fp16" else None
    state, source = resume
    epoch0, iter0, meters, evaluations = restore(state, model, optimizer, scaler)
    check_resumable(state or {}, source, iter0, world, len(train_set))  # on every rank: it compares them
    metric = f"val_{task.metric}"

    if rank0 and state is not None:
        print(f"Resumed from {source}: " + (f"epoch {epoch0 + 1}/{schedule.num_epochs}, iteration {iter0}"
                                            if epoch0 < schedule.num_epochs else "training is over"))
    describe_data(train=train_set, val=val_set)
    if rank0:
        utils.write_json(vars(args), run_dir / "args.json")
        lr_curve = [(e / 20, schedule.lr_at(e / 20)) for e in range(20 * schedule.num_epochs + 1)]
        utils.write_json({"stages": [dataclasses.asdict(s) for s in schedule.stages], "lr": lr_curve},
                         run_dir / "schedule.json")
        print(schedule.table(len(train_set), world))
        for warning in warnings:
            print(warning, file=sys.stderr)

    def save(epoch: int, iteration: int, epoch_meters: dict | None = None, pending: dict | None = None) -> None:
        sync_bn_stats(model)  # every rank saves at the same points; rank 0 writes
        if rank0:
            utils.save_run_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "iteration": iteration,
                "epoch_meters": epoch_meters, "evaluations": evaluations, "pending_evaluation": pending,
                "best_metric": max((e[metric] for e in evaluations if metric in e), default=0.0),
                "args": vars(args), "model_cfg": dataclasses.asdict(model.cfg), "world_size": world,
                "num_train_samples": len(train_set),
                "depthwise_backward": depthwise_conv.choices(), **extras}, run_dir)

    def end_epoch(epoch: int, stats: dict) -> dict:
        """Evaluate when due, save, log and print the epoch's line.

        The checkpoint taken before an evaluation holds the epoch's statistics (`pending_evaluation`): a run killed
        while it evaluates (the launcher kills workers that take long to stop after Ctrl-C) resumes by evaluating,
        not by training the epoch again."""
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == schedule.num_epochs:
            save(epoch + 1, 0, pending=stats)
            stats = {**stats, **validate(model, task, train_set, val_set, schedule, epoch, args, device)}
            evaluations.append({k: v for k, v in stats.items() if k.startswith("val_") and isinstance(v, int | float)})
        save(epoch + 1, 0)
        log.log(stats, epoch + 1)
        if rank0:
            print(f"epoch {epoch + 1}/{schedule.num_epochs}  " + "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()
                if not isinstance(v, dict)))
        return stats

    stats: dict = {}
    if (state or {}).get("pending_evaluation") is not None:  # stopped while evaluating: evaluate again
        set_bn_splits(model, schedule.shape_at(epoch0 - 1).bn_splits, schedule.shape_at(epoch0 - 1).bn_sync)
        stats = end_epoch(epoch0 - 1, state["pending_evaluation"])
    loader = train_loader(train_set, schedule, epoch0, args, start_iter=iter0, end_epoch=schedule.num_epochs)
    batches = iter(loader)
    stop = utils.StopRequest()  # Ctrl-C: finish the step, save, print how to resume (the loop's handler)
    for epoch in stop.during(range(epoch0, schedule.num_epochs)):
        shape = schedule.shape_at(epoch)
        set_bn_splits(model, shape.bn_splits, shape.bn_sync)
        num_iters = loader.batch_sampler.batches_in(epoch)
        scale = task.lr_scale(evaluations) if task.lr_scale else 1.0
        train_stats = train_one_epoch(
            net, itertools.islice(batches, num_iters - iter0), optimizer, task.loss, epoch=epoch, num_iters=num_iters,
            num_epochs=schedule.num_epochs, lr_at=lambda e, s=scale: s * schedule.lr_at(e), device=device,
            seed=args.seed, start_iter=iter0, meters=meters, amp=args.amp, scaler=scaler, clip_grad=args.clip_grad,
            save_fn=lambda it, m, e=epoch: save(e, it, m), save_every=args.save_every,
            progress=not args.no_progress, should_stop=stop)
        iter0, meters = 0, None
        stats = {f"train_{k}": v for k, v in train_stats.items()}
        stats.update(shape=f"{shape.frames}x{shape.crop}", batch=shape.batch_size, bn_splits=shape.bn_splits,
                     failed_samples=check_failures(train_set, device))
        stats = end_epoch(epoch, stats)
    return stats


def validate(model: nn.Module, task: Task, train_set: Any, val_set: Any, schedule: MultigridSchedule, epoch: int,
             args: argparse.Namespace, device: torch.device) -> dict:
    """Precise BN at the base shape, then the task's evaluation on the validation set.

    The validation clips have the base shape whatever the long cycle trains at, so the BN statistics are taken on
    training batches of that shape (the last epoch's): statistics of 2-frame clips make an 8-frame clip look
    out of distribution and cost tens of points in the middle of a long cycle.
    """
    out = {}
    if args.precise_bn_batches > 0:
        final = schedule.num_epochs - 1
        loader = train_loader(train_set, schedule, final, args, short_cycle=False)
        set_bn_splits(model, schedule.shape_at(final).bn_splits, schedule.shape_at(final).bn_sync)
        out["precise_bn_batches"] = precise_bn(model, loader, args.precise_bn_batches, device, amp=args.amp)
        set_bn_splits(model, schedule.shape_at(epoch).bn_splits, schedule.shape_at(epoch).bn_sync)
    else:
        sync_bn_stats(model)  # without it each rank would score its share of the videos with its own statistics
    out.update(task.evaluate(model, val_set, "val"))
    return out


def test(model: nn.Module, task: Task, dataset: Any, log: utils.RunLogger | None = None, epoch: int = 0) -> dict:
    """The final (or --eval) evaluation: logged at `epoch` when there is a log, and its result line printed."""
    stats = task.evaluate(model, dataset, "test")
    if log is not None:
        log.log(stats, epoch)
    if is_main_process():
        print(task.result_line(stats, "test"))
    return stats
