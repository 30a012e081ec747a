"""Training and evaluation loops shared by the recipes: one epoch of SGD, multi-view prediction, precise BN."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from utils import Interrupted, get_world_size, is_main_process

BN_STAT_SUFFIXES = ("running_mean", "running_var")


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when any rank's loss is NaN or infinite."""


class TrainingStopped(Interrupted):
    """Raised on every rank when a stop was requested on any rank (Ctrl-C); `iteration` steps of `epoch` are done."""

    def __init__(self, epoch: int, iteration: int, saved: bool) -> None:
        super().__init__(f"Ctrl-C: stopped at epoch {epoch}, iteration {iteration}"
                         + (" and saved a checkpoint there" if saved else ""))
        self.epoch, self.iteration = epoch, iteration


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD with Nesterov momentum; no weight decay on BN parameters and biases (all 1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (bf16 autocast was measured slower than fp32 on CPU)."""
    enabled = device.type == "cuda" and amp != "none"
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def to_device(clips: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a (N, C, T, H, W) batch to the device in channels_last_3d, the fast layout for depthwise Conv3d."""
    return clips.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last_3d)


def iteration_seed(seed: int, epoch: int, iteration: int) -> int:
    """Seed for the global RNG (dropout) at one iteration, so a resumed run repeats the same random draws."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + iteration


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------
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
    amp: str = "none",
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    save_fn: Callable[[int], None] | None = None,
    save_every: int = 0,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """One pass over `loader` (which already skips the first `start_iter` batches when resuming); returns averages,
    and under "shapes" the seconds, iterations and data wait of each batch shape (`batch x frames x crop`), the
    short cycle's included, so that the cost of an iteration can be compared across multigrid's shapes."""
    model.train()
    meters = {"loss": 0.0, "top1": 0.0, "clips": 0, "iters": 0, "wait": 0.0}
    shapes: dict[str, dict[str, float]] = {}
    bar = tqdm(total=num_iters, initial=start_iter, disable=not (progress and is_main_process()),
               desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)
    start = tick = time.perf_counter()
    for it, (clips, targets) in enumerate(loader, start=start_iter):
        wait = time.perf_counter() - tick  # time spent waiting for the data loader
        meters["wait"] += wait
        lr = lr_at(epoch + it / num_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(iteration_seed(seed, epoch, it))
        clips, targets = to_device(clips, device), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(clips)
            loss = criterion(logits.float(), targets)

        # Every rank must stop together, or the others hang in the next all-reduce: the loss check and a stop
        # request (Ctrl-C on any rank, `should_stop`) travel in one all-reduce, before the update. CPU-GPU sync point.
        stop = float(should_stop is not None and should_stop())
        check = torch.stack([loss.detach().float(), torch.tensor(stop, device=loss.device)])
        if get_world_size() > 1:
            dist.all_reduce(check)
        total_loss, stops = check.tolist()
        if stops > 0:
            bar.close()
            if save_fn is not None:
                save_fn(it)  # the weights after `it` steps: this step has not updated them
            if get_world_size() > 1:
                dist.barrier()  # the launcher ends every worker once one exits: let rank 0 finish writing first
            raise TrainingStopped(epoch, it, saved=save_fn is not None)
        if not math.isfinite(total_loss):
            raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at epoch {epoch}, iteration {it} "
                                     f"(lr {lr:.4g}); stopping. The last checkpoint written is kept.")
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

        n = clips.shape[0]
        meters["loss"] += loss.item() * n
        # on a GPU the step may still run here; its time then falls on the next iteration of the same shape mostly
        shape = shapes.setdefault(f"{n}x{clips.shape[2]}x{clips.shape[3]}", {"seconds": 0.0, "iters": 0, "wait": 0.0})
        shape["seconds"] += time.perf_counter() - tick
        shape["iters"] += 1
        shape["wait"] += wait
        meters["clips"] += n
        meters["iters"] += 1
        if targets.dtype == torch.long:  # single-label task: report batch top-1
            meters["top1"] += (logits.argmax(1) == targets).sum().item()
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{100 * meters['top1'] / meters['clips']:.1f}",
                        lr=f"{lr:.3g}", shape=f"{n}x{clips.shape[2]}x{clips.shape[3]}",
                        clips_s=f"{meters['clips'] / elapsed:.1f}", wait=f"{100 * meters['wait'] / elapsed:.0f}%")
        bar.update(1)
        if save_fn is not None and save_every and (it + 1) % save_every == 0 and it + 1 < num_iters:
            save_fn(it + 1)
        tick = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - start
    clips_seen = max(meters["clips"], 1)
    return {
        "loss": meters["loss"] / clips_seen,
        "top1": 100 * meters["top1"] / clips_seen,
        "lr": lr_at(epoch + 1 - 1e-9),
        "clips_per_s": meters["clips"] / max(elapsed, 1e-9),
        "data_wait": meters["wait"] / max(elapsed, 1e-9),
        "seconds": elapsed,
        "iters": meters["iters"],
        "shapes": shapes,
    }


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

    `loader` yields (clips, targets, video_index, view_index) and must give each view to exactly one rank (no
    padding), so summing across ranks counts every view once, whatever the number of processes. Views marked with
    view index -1 (the video failed to decode) are not scored; their video's count stays below the number of views.
    """
    model.eval()
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
        with autocast(device, amp):
            logits = model(to_device(clips, device)).float().cpu()
        probs = logits.softmax(1) if activation == "softmax" else logits.sigmoid()
        if reduce == "max":
            scores.index_reduce_(0, video_index, probs.double(), "amax")
        else:
            scores.index_add_(0, video_index, probs.double())
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
    """Combine each rank's BN statistics (ranks as groups: law of total variance) so all ranks hold the same."""
    world = get_world_size()
    if world == 1:
        return
    for m in _bn_layers(model):
        if m.running_mean is None:
            continue
        mean = m.running_mean.clone()
        second = m.running_var + mean.square()  # E[x²] per rank
        dist.all_reduce(mean)
        dist.all_reduce(second)
        mean /= world
        m.running_mean.copy_(mean)
        m.running_var.copy_(second / world - mean.square())

