"""X3D video networks (XS, S, M, L, XL) with sub-batch and synchronised BatchNorm for multigrid training.

Feichtenhofer, "X3D: Expanding Architectures for Efficient Video Recognition", CVPR 2020, arXiv:2004.04730.
The family expands one small ResNet-like base along width and depth; XS, S and M are the same network (same weights
shapes) that differ only in the input they are trained and tested on.

Shapes: the model takes float clips (N, 3, T, H, W). The stem and each of the four stages halve H and W (/32 in total);
T is never strided, and the head pools adaptively, so any T/H/W works (multigrid relies on it). The clip head returns
logits (N, K); the per-frame head (localization) keeps T and returns (N, K, T).

| variant | frames x rate | train crop (jitter) | test crop | width, depth | params     | GFLOPs at train input |
|---------|---------------|---------------------|-----------|--------------|------------|-----------------------|
| x3d_xs  | 4 x 12        | 160 [182, 228]      | 182       | 2.0, 2.2     |  3,794,322 |  0.60 (4x160²)        |
| x3d_s   | 13 x 6        | 160 [182, 228]      | 182       | 2.0, 2.2     |  3,794,322 |  1.96 (13x160²)       |
| x3d_m   | 16 x 5        | 224 [256, 320]      | 256       | 2.0, 2.2     |  3,794,322 |  4.73 (16x224²)       |
| x3d_l   | 16 x 5        | 312 [356, 446]      | 356       | 2.0, 5.0     |  6,153,432 | 18.37 (16x312²)       |
| x3d_xl  | 16 x 5        | 312 [356, 446]      | 356       | 2.9, 5.0     | 11,095,904 | 35.84 (48.41 at 356²) |

GFLOPs are multiply-adds of one clip (torch.utils.flop_counter counts / 2), the convention of the paper and the model
zoos. Widths are rounded to multiples of 8 as in the X3D code released with the paper (also PyTorchVideo's and the
original X3D-Multigrid repository's): XL is 32/72/136/280 wide and costs 48.4 GFLOPs at 356², the paper's figure.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import batch_norm
from depthwise_conv import DepthwiseConv3d
from fused_conv import FusedConv3d

logger = logging.getLogger(__name__)

INPUT_FIELDS = ("frames", "sampling_rate", "train_crop", "train_jitter", "test_crop")
# Positions per clip (T x H x W) up to which the CPU runs a 1x1x1 convolution as a matrix product (PointwiseConv3d):
# the sizes at which that was measured faster on both CPU kinds (benchmarks/README.md).
MATMUL_POSITIONS = 128


@dataclass(frozen=True, kw_only=True)
class X3DConfig:
    """Architecture and default input of one model; `dataclasses.asdict` of it is what checkpoints store."""

    name: str
    num_classes: int = 400
    head: str = "clip"  # "clip" -> (N, K) logits, "frame" -> (N, K, T) per-frame logits
    dropout: float = 0.5
    width_factor: float
    depth_factor: float
    frames: int  # clip length T
    sampling_rate: int  # take every n-th frame of a 30 fps video
    train_crop: int
    train_jitter: tuple[int, int]  # short side drawn from [min, max] before the random train crop
    test_crop: int  # short side resized to this, then 3 square crops of this size


# ----------------------------------------------------------------------------------------------------------------------
# Width and depth expansion
# ----------------------------------------------------------------------------------------------------------------------
STEM_BASE = 12  # stem width before the width factor
STAGE_BASES = (12, 24, 48, 96)  # stage output widths before the width factor (each stage doubles)
STAGE_BLOCKS = (1, 2, 5, 3)  # blocks per stage before the depth factor
BOTTLENECK_FACTOR = 2.25  # inner (depthwise) width = int(2.25 x stage width)
SE_RATIO = 1 / 16
HEAD_WIDTH = 2048  # width of the pre-logit features


def round_width(width: float, multiplier: float, min_width: int = 8, divisor: int = 8) -> int:
    """`width x multiplier` rounded to a multiple of `divisor`, at least `min_width` and 90% of the product."""
    scaled = width * multiplier
    rounded = max(min_width, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def stage_plan(width_factor: float, depth_factor: float) -> tuple[int, list[tuple[int, int, int]]]:
    """Stem width and (output width, inner width, number of blocks) of each of the four stages."""
    stages = []
    for base, blocks in zip(STAGE_BASES, STAGE_BLOCKS):
        width = round_width(base, width_factor)
        stages.append((width, int(BOTTLENECK_FACTOR * width), math.ceil(blocks * depth_factor)))
    return round_width(STEM_BASE, width_factor), stages


# ----------------------------------------------------------------------------------------------------------------------
# Blocks: Swish, sub-batch and synchronised BN, SE, stem, bottleneck, head
# ----------------------------------------------------------------------------------------------------------------------
class _SwishFunction(torch.autograd.Function):
    """x * sigmoid(x) keeping only x for backward, where the sigmoid is recomputed (one activation less in memory)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.silu(x)  # x * sigmoid(x) in one fused kernel

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, x)  # grad * sigmoid(x) * (1 + x * (1 - sigmoid(x))), one kernel


class Swish(nn.Module):
    """Memory-efficient Swish activation, x * sigmoid(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwishFunction.apply(x)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training batch norm over the clips of every rank in `group`, from all-reduced per-channel sums.

    Forward all-reduces each channel's sum, sum of squares and element count, normalises with the group's mean and
    biased variance and updates the running statistics with the unbiased one, the same update on every rank. Every
    rank's output depends on every rank's input through those statistics, so backward all-reduces the two sums the
    input gradient needs (of the output gradient, and of it times the centred input). The weight and bias gradients
    stay this rank's, like any parameter's: DDP averages them. Arithmetic in float32 (float64 for float64 inputs)
    whatever the autocast dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, momentum: float, eps: float, group: Any) -> torch.Tensor:
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(dtype)
            var, mean = torch.var_mean(xf, dims, correction=0)
            n = x.numel() // c
            # Float64 sums: E[x²] − E[x]² over the group then loses nothing to cancellation.
            mean64 = mean.double()
            stats = torch.cat([mean64 * n, (var.double() + mean64.square()) * n, mean64.new_full((1,), n)])
            dist.all_reduce(stats, group=group)
            count = stats[-1:]
            mean64 = stats[:c] / count
            var64 = (stats[c:2 * c] / count - mean64.square()).clamp_min(0)
            running_mean.lerp_(mean64.to(running_mean.dtype), momentum)
            running_var.lerp_((var64 * count / (count - 1).clamp_min(1)).to(running_var.dtype), momentum)
            mean, invstd = mean64.to(dtype), torch.rsqrt(var64 + eps).to(dtype)
            scale = weight.to(dtype) * invstd
            view = (1, c) + (1,) * (x.dim() - 2)  # per-channel values broadcast over (N, C, T, H, W)
            # (x − mean)·scale + β as one multiply-add: x·scale + (β − mean·scale)
            out = torch.addcmul((bias.to(dtype) - mean * scale).view(view), xf, scale.view(view))
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd, count = ctx.saved_tensors
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        view = (1, c) + (1,) * (x.dim() - 2)
        with torch.autocast(x.device.type, enabled=False):
            g, xf = grad.to(mean.dtype), x.to(mean.dtype)
            sums = torch.cat([g.sum(dims), (g * (xf - mean.view(view))).sum(dims)])  # Σ dy, Σ dy·(x − mean)
            grad_weight = sums[c:] * invstd  # this rank's, before the all-reduce
            grad_bias = sums[:c].clone()
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xmu = (sums / count.to(sums.dtype)).split(c)
            # dx = scale · (dy − mean_dy − (x − mean) · invstd² · mean_dy_xmu), as a·dy + b·x + d per channel
            a = weight.to(mean.dtype) * invstd
            b = -a * invstd.square() * mean_dy_xmu
            d = -a * mean_dy - b * mean
            grad_input = torch.addcmul(d.view(view), xf, b.view(view)).addcmul_(g, a.view(view))
        return grad_input.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), *(None,) * 5


def _fold_before_save(module: SubBatchNorm3d, prefix: str, keep_vars: bool) -> None:
    module.aggregate_stats()


def _fold_before_load(module: SubBatchNorm3d, *args: Any) -> None:
    module.aggregate_stats()  # a load that skips this layer must not drop training updates not yet folded in


def _tile_after_load(module: SubBatchNorm3d, incompatible_keys: Any) -> None:
    module.tile_running_stats()


class SubBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that, in training, normalises k groups of the batch separately, or the batches of several ranks
    together (synchronised BN).

    Group g is the run of clips g*N/k .. (g+1)*N/k - 1 (batch_norm.py, which trains float32 channels-last CPU inputs
    in C, any k, and others with ATen's kernels); X3D.forward orders its batch so that clip i lands in group i mod k,
    as in PySlowFast.

    Parameters and state-dict keys are those of a plain BatchNorm3d, so saved weights never depend on k. The per-group
    running statistics live in non-persistent buffers of length k*C (group-major, as PySlowFast's split_bn) and are
    folded into running_mean/var (law of total variance) on eval(), in state_dict() and before any eval forward, so
    evaluation never reads stale statistics. Folding restarts every group from the pooled statistics, which is also what
    loading does, so a model resumed from a checkpoint continues exactly like one that never stopped. With k = 1 the
    layer is nn.BatchNorm3d (exactly, where batch_norm.c does not train it).

    With a process group (k = 1), training normalises over the union of the group's batches (see
    _SyncBatchNormFunction); evaluation is unchanged, and the group is not part of the state.
    """

    def __init__(self, num_features: int, num_splits: int = 1, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.num_splits = 1
        self.process_group = None  # training statistics over this group's ranks; None: this rank's batch only
        self.register_buffer("split_mean", None, persistent=False)
        self.register_buffer("split_var", None, persistent=False)
        self.split_stats_fresh = False  # the groups hold updates not yet folded into running_mean/var
        self.register_state_dict_pre_hook(_fold_before_save)
        self.register_load_state_dict_pre_hook(_fold_before_load)
        self.register_load_state_dict_post_hook(_tile_after_load)
        self.set_splits(num_splits)

    @torch.no_grad()
    def set_splits(self, k: int, group: Any = None) -> None:
        """Use k groups, or with a process group (k = 1) the union of its ranks' batches, from now on.

        Parameters stay the same objects and the statistics carry over (tiled). On joining a process group, which
        every rank of it must do at the same point, its ranks' running statistics are pooled, so that from then on
        they hold the same values.
        """
        if k < 1:
            raise ValueError(f"sub-batch BatchNorm: the number of splits must be >= 1, got {k}")
        if k > 1 and group is not None:
            raise ValueError(f"BatchNorm: synchronised statistics need a single split per device, got {k} splits")
        self.aggregate_stats()
        self.num_splits = k
        self.split_mean = self.running_mean.repeat(k) if k > 1 else None
        self.split_var = self.running_var.repeat(k) if k > 1 else None
        if group is not None and group is not self.process_group:
            self._pool_running_stats(group)
        self.process_group = group

    @torch.no_grad()
    def _pool_running_stats(self, group: Any) -> None:
        """Replace every rank's running statistics by those of the group's union (law of total variance)."""
        stats = torch.cat([self.running_mean, self.running_var + self.running_mean.square()])
        dist.all_reduce(stats, group=group)
        mean, second = (stats / dist.get_world_size(group)).chunk(2)
        self.running_mean.copy_(mean)
        self.running_var.copy_(second - mean.square())

    @torch.no_grad()
    def aggregate_stats(self) -> None:
        """Fold the group statistics into running_mean/var: mean of means; mean of variances + variance of means."""
        if not self.split_stats_fresh:
            return
        means = self.split_mean.view(self.num_splits, -1)  # (k, C): group g owns entries g*C .. g*C + C - 1
        variances = self.split_var.view(self.num_splits, -1)
        mean = means.mean(0)
        self.running_mean.copy_(mean)
        self.running_var.copy_(variances.mean(0) + (means - mean).square().mean(0))
        self.tile_running_stats()

    @torch.no_grad()
    def tile_running_stats(self) -> None:
        """Restart every group from running_mean/var (this leaves their aggregate unchanged)."""
        if self.num_splits > 1:
            self.split_mean.copy_(self.running_mean.repeat(self.num_splits))
            self.split_var.copy_(self.running_var.repeat(self.num_splits))
        self.split_stats_fresh = False

    def reset_running_stats(self) -> None:
        """Reset running_mean/var, the group statistics and the batch counter."""
        super().reset_running_stats()
        if getattr(self, "split_mean", None) is not None:  # BatchNorm's __init__ calls this before they exist
            self.tile_running_stats()

    def train(self, mode: bool = True) -> SubBatchNorm3d:
        if not mode:
            self.aggregate_stats()
        elif not self.training:
            # Outside training running_mean/var are the truth: they may have been loaded, averaged across ranks or
            # re-estimated (precise BN) meanwhile.
            self.tile_running_stats()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.num_splits
        if self.training and self.process_group is not None:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                                momentum, self.eps, self.process_group)
        if not self.training or (k == 1 and not batch_norm.in_c(x, self.weight, self.bias)):
            self.aggregate_stats()  # no-op unless training updated the groups since the last fold
            return super().forward(x)
        if x.shape[0] % k:
            raise ValueError(
                f"sub-batch BatchNorm: a training batch of {x.shape[0]} clips cannot be split into {k} equal groups; "
                f"use a per-device batch size divisible by {k}, or change the split count with x3d.set_bn_splits()")
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        if k > 1:
            self.split_stats_fresh = True
        means, variances = (self.split_mean, self.split_var) if k > 1 else (self.running_mean, self.running_var)
        return batch_norm.train(x, self.weight, self.bias, means, variances, k, momentum, self.eps)

    def extra_repr(self) -> str:
        sync = "" if self.process_group is None else f", sync_devices={dist.get_world_size(self.process_group)}"
        return f"{super().extra_repr()}, num_splits={self.num_splits}{sync}"


class SqueezeExcitation(nn.Module):
    """Channel gating from the clip-wide average: 1x1x1 conv -> ReLU -> 1x1x1 conv -> sigmoid -> scale."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.fc1 = nn.Conv3d(channels, width, 1)
        self.fc2 = nn.Conv3d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, 1, 1, 1) factors in (0, 1) from the clip-wide average of x."""
        return torch.sigmoid(as_matmul(self.fc2, F.relu(as_matmul(self.fc1, x.mean((2, 3, 4), keepdim=True)),
                                                       inplace=True)))


def as_matmul(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """The 1x1x1 convolution `conv` of x (N, C, T, H, W) as the matrix product it is, with its own parameters.

    x is seen as (N, T, H, W, C), which is its memory when channels-last (no copy), and the output comes back in that
    layout. Where a clip has few positions (pooled features, late stages) oneDNN's 1x1x1 convolution forward and
    backward take longer on the CPU than the same product through F.linear's GEMMs, several times longer on pooled
    features at multigrid's many-clip shapes; at the large early layers the convolution is faster
    (benchmarks/README.md).
    """
    out = F.linear(x.permute(0, 2, 3, 4, 1), conv.weight.flatten(1), conv.bias)  # (N, T, H, W, C_out)
    return out.permute(0, 4, 1, 2, 3)


class PointwiseConv3d(nn.Conv3d):
    """nn.Conv3d(dim_in, dim_out, 1, stride, bias=False), the same parameters. On the CPU it is a matrix product
    (`as_matmul`, of the strided view) where an output clip has at most MATMUL_POSITIONS positions (T x H x W): the
    sizes at which that was measured faster on both CPU kinds. Folded inference replaces it by a FusedConv3d."""

    def __init__(self, dim_in: int, dim_out: int, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__(dim_in, dim_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            st, sh, sw = self.stride
            x_out = x[:, :, ::st, ::sh, ::sw]  # the positions a 1x1x1 kernel with this stride reads
            if x_out.shape[2] * x_out.shape[3] * x_out.shape[4] <= MATMUL_POSITIONS:
                return as_matmul(self, x_out)
        return super().forward(x)


class Stem(nn.Module):
    """1x3x3 conv with spatial stride 2, then a depthwise 5x1x1 temporal conv, BN, ReLU (no pooling)."""

    folded = False  # fold_batchnorm's copy: BN and ReLU in conv_t

    def __init__(self, width: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv_s = nn.Conv3d(3, width, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
        self.conv_t = DepthwiseConv3d(width, (5, 1, 1), padding=(2, 0, 0))
        self.bn = norm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.conv_t(self.conv_s(x))
        return F.relu(self.bn(self.conv_t(self.conv_s(x))), inplace=True)

    def fold(self) -> None:
        self.conv_s, self.conv_t = FusedConv3d(self.conv_s), FusedConv3d(self.conv_t, self.bn, "relu")
        self.bn, self.folded = None, True


class Bottleneck(nn.Module):
    """X3D residual block: 1x1x1 expand -> 3x3x3 depthwise (spatial stride) -> [SE] -> Swish -> 1x1x1 project."""

    folded = False  # fold_batchnorm's copy: each BN and the activation after it in its convolution

    def __init__(self, dim_in: int, dim_out: int, dim_inner: int, stride: int, use_se: bool,
                 norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv_a = PointwiseConv3d(dim_in, dim_inner)
        self.bn_a = norm(dim_inner)
        self.conv_b = DepthwiseConv3d(dim_inner, 3, stride=(1, stride, stride), padding=1)
        self.bn_b = norm(dim_inner)
        self.se = SqueezeExcitation(dim_inner, round_width(dim_inner, SE_RATIO)) if use_se else None
        self.swish = Swish()
        self.conv_c = PointwiseConv3d(dim_inner, dim_out)
        self.bn_c = norm(dim_out)
        # Every strided block projects its shortcut, stage 1's 24 -> 24 included, as PySlowFast and the original
        # repository do (PyTorchVideo leaves out that BN; its checkpoints get an identity one, see checkpoints.py).
        self.shortcut_conv, self.shortcut_bn = None, None
        if stride != 1 or dim_in != dim_out:
            self.shortcut_conv = PointwiseConv3d(dim_in, dim_out, stride=(1, stride, stride))
            self.shortcut_bn = norm(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.forward_folded(x)
        out = F.relu(self.bn_a(self.conv_a(x)), inplace=True)
        out = self.bn_b(self.conv_b(out))
        if self.se is not None:
            out = self.se(out)
        out = self.bn_c(self.conv_c(self.swish(out)))
        shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
        return F.relu(out + shortcut, inplace=True)

    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_b(self.conv_a(x))  # ReLU in conv_a; Swish in conv_b unless SE comes between
        if self.se is not None:  # in place: out is this block's own
            out = F.silu(out.mul_(self.se.gate(out)), inplace=True)
        shortcut = x if self.shortcut_conv is None else self.shortcut_conv(x)
        return self.conv_c(out, shortcut)  # ReLU(conv_c(out) + shortcut)

    def fold(self) -> None:
        self.conv_a = FusedConv3d(self.conv_a, self.bn_a, "relu")
        self.conv_b = FusedConv3d(self.conv_b, self.bn_b, "none" if self.se is not None else "swish")
        self.conv_c = FusedConv3d(self.conv_c, self.bn_c, "relu", residual=True)
        if self.shortcut_conv is not None:
            self.shortcut_conv = FusedConv3d(self.shortcut_conv, self.shortcut_bn)
        self.bn_a = self.bn_b = self.bn_c = self.shortcut_bn = None
        self.folded = True


class X3DHead(nn.Module):
    """1x1x1 conv + BN + ReLU, average pool, 1x1x1 conv to 2048 + ReLU, dropout, linear classifier.

    The clip head pools globally and returns (N, K); the per-frame head pools only H, W and returns (N, K, T).
    """

    folded = False  # fold_batchnorm's copy: pre_bn and its ReLU in pre_conv

    def __init__(self, dim_in: int, dim_inner: int, num_classes: int, dropout: float, per_frame: bool,
                 norm: Callable[[int], nn.Module]):
        super().__init__()
        self.per_frame = per_frame
        self.pre_conv = PointwiseConv3d(dim_in, dim_inner)
        self.pre_bn = norm(dim_inner)
        self.post_conv = nn.Conv3d(dim_inner, HEAD_WIDTH, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_WIDTH, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_conv(x) if self.folded else F.relu(self.pre_bn(self.pre_conv(x)), inplace=True)
        # Adaptive pooling (a mean), so every clip length and crop works: (N, C, T, 1, 1) or (N, C, 1, 1, 1).
        x = x.mean((3, 4), keepdim=True) if self.per_frame else x.mean((2, 3, 4), keepdim=True)
        x = F.relu(as_matmul(self.post_conv, x), inplace=True)  # no BN to fold; oneDNN is slower on pooled features
        x = self.classifier(self.dropout(x.flatten(2).transpose(1, 2)))  # (N, T or 1, 2048) -> (N, T or 1, K)
        return x.transpose(1, 2) if self.per_frame else x[:, 0]

    def fold(self) -> None:
        self.pre_conv = FusedConv3d(self.pre_conv, self.pre_bn, "relu")
        self.pre_bn, self.folded = None, True


# ----------------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------------
class X3D(nn.Module):
    """X3D network built from an X3DConfig; every BatchNorm is a SubBatchNorm3d with `bn_splits` groups."""

    def __init__(self, cfg: X3DConfig, bn_splits: int = 1):
        super().__init__()
        if cfg.head not in ("clip", "frame"):
            raise ValueError(f"X3D head must be 'clip' or 'frame', got {cfg.head!r}")
        self.cfg = cfg
        norm = partial(SubBatchNorm3d, num_splits=bn_splits)
        stem_width, stages = stage_plan(cfg.width_factor, cfg.depth_factor)
        self.stem = Stem(stem_width, norm)
        self.stages = nn.ModuleList()
        dim_in = stem_width
        for dim_out, dim_inner, num_blocks in stages:
            # Spatial stride 2 in the first block of each stage; SE on blocks 0, 2, 4, ... of each stage.
            self.stages.append(nn.Sequential(*[
                Bottleneck(dim_in if j == 0 else dim_out, dim_out, dim_inner, stride=2 if j == 0 else 1,
                           use_se=j % 2 == 0, norm=norm)
                for j in range(num_blocks)]))
            dim_in = dim_out
        self.head = X3DHead(dim_in, dim_inner, cfg.num_classes, cfg.dropout, cfg.head == "frame", norm)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for stage in self.stages:
            for block in stage:
                nn.init.zeros_(block.bn_c.weight)  # each residual branch starts at zero: blocks begin as identities

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) clips -> (N, C5, T, H/32, W/32) features of the last stage."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage features -> logits (N, K), or (N, K, T) for the per-frame head."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.stem.bn.num_splits if self.training else 1  # set_bn_splits gives every layer the same k
        if k == 1 or x.shape[0] % k:  # (an indivisible batch gets SubBatchNorm3d's error)
            return self.forward_head(self.forward_features(x))
        # Sub-batch BN normalises runs of N/k consecutive clips. Ordered group by group, clip i of the batch lands in
        # run i mod k: PySlowFast's groups, at the cost of reordering the input clips and the outputs.
        clips = x.unflatten(0, (-1, k)).transpose(0, 1).flatten(0, 1)
        out = self.forward_head(self.forward_features(clips.contiguous(memory_format=batch_norm.dense_format(x))))
        return out.unflatten(0, (k, -1)).transpose(0, 1).flatten(0, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Variants: each factory carries its architecture and default input
# ----------------------------------------------------------------------------------------------------------------------
def _with_cfg(cfg: X3DConfig) -> Callable[[Callable[..., X3D]], Callable[..., X3D]]:
    """Attach a variant's config to its factory, so `default_input` can read it without building a model."""

    def attach(factory: Callable[..., X3D]) -> Callable[..., X3D]:
        factory.default_cfg = cfg
        return factory

    return attach


def _create(cfg: X3DConfig, num_classes: int = 400, *, dropout: float = 0.5, head: str = "clip",
            bn_splits: int = 1) -> X3D:
    return X3D(dataclasses.replace(cfg, num_classes=num_classes, dropout=dropout, head=head), bn_splits=bn_splits)


@_with_cfg(X3DConfig(name="x3d_xs", width_factor=2.0, depth_factor=2.2, frames=4, sampling_rate=12, train_crop=160,
                     train_jitter=(182, 228), test_crop=182))
def x3d_xs(num_classes: int = 400, **options: Any) -> X3D:
    """X3D-XS: 4 frames every 12th, 160² crop; 3.79 M params, 0.60 GFLOPs."""
    return _create(x3d_xs.default_cfg, num_classes, **options)


@_with_cfg(X3DConfig(name="x3d_s", width_factor=2.0, depth_factor=2.2, frames=13, sampling_rate=6, train_crop=160,
                     train_jitter=(182, 228), test_crop=182))
def x3d_s(num_classes: int = 400, **options: Any) -> X3D:
    """X3D-S: 13 frames every 6th, 160² crop; 3.79 M params, 1.96 GFLOPs."""
    return _create(x3d_s.default_cfg, num_classes, **options)


@_with_cfg(X3DConfig(name="x3d_m", width_factor=2.0, depth_factor=2.2, frames=16, sampling_rate=5, train_crop=224,
                     train_jitter=(256, 320), test_crop=256))
def x3d_m(num_classes: int = 400, **options: Any) -> X3D:
    """X3D-M: 16 frames every 5th, 224² crop; 3.79 M params, 4.73 GFLOPs."""
    return _create(x3d_m.default_cfg, num_classes, **options)


@_with_cfg(X3DConfig(name="x3d_l", width_factor=2.0, depth_factor=5.0, frames=16, sampling_rate=5, train_crop=312,
                     train_jitter=(356, 446), test_crop=356))
def x3d_l(num_classes: int = 400, **options: Any) -> X3D:
    """X3D-L: 16 frames every 5th, 312² crop, 2.3x deeper; 6.15 M params, 18.37 GFLOPs."""
    return _create(x3d_l.default_cfg, num_classes, **options)


@_with_cfg(X3DConfig(name="x3d_xl", width_factor=2.9, depth_factor=5.0, frames=16, sampling_rate=5, train_crop=312,
                     train_jitter=(356, 446), test_crop=356))
def x3d_xl(num_classes: int = 400, **options: Any) -> X3D:
    """X3D-XL (no FAIR release): L made 1.45x wider; 11.10 M params, 35.84 GFLOPs (48.41 at the 356² test crop)."""
    return _create(x3d_xl.default_cfg, num_classes, **options)


MODELS: dict[str, Callable[..., X3D]] = {
    "x3d_xs": x3d_xs,
    "x3d_s": x3d_s,
    "x3d_m": x3d_m,
    "x3d_l": x3d_l,
    "x3d_xl": x3d_xl,
}


def _factory(name: str) -> Callable[..., X3D]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def build_model(name: str, num_classes: int = 400, *, dropout: float = 0.5, head: str = "clip",
                bn_splits: int = 1) -> X3D:
    """A freshly initialised registered variant; head="clip" returns (N, K), head="frame" returns (N, K, T)."""
    return _factory(name)(num_classes, dropout=dropout, head=head, bn_splits=bn_splits)


def build_model_from_cfg(cfg: dict) -> X3D:
    """Rebuild a model from a checkpoint's `model_cfg` (fields missing there come from the named variant)."""
    fields = {f.name for f in dataclasses.fields(X3DConfig)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"model_cfg has unknown fields {unknown}; expected a subset of {sorted(fields)}")
    defaults = dataclasses.asdict(_factory(cfg["name"]).default_cfg) if cfg.get("name") in MODELS else {}
    merged = {**defaults, **cfg}
    missing = sorted(fields - set(merged))
    if missing:
        raise ValueError(f"model_cfg for {cfg.get('name')!r} lacks {missing} and names no registered variant")
    merged["train_jitter"] = tuple(merged["train_jitter"])  # JSON turns the tuple into a list
    return X3D(X3DConfig(**merged))


def default_input(name: str) -> dict:
    """The variant's default input: frames, sampling_rate, train_crop, train_jitter, test_crop."""
    cfg = _factory(name).default_cfg
    return {key: getattr(cfg, key) for key in INPUT_FIELDS}


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert a model to channels_last_3d (the layout it trains and runs in), in place, and return it.

    Weights whose memory order the conversion does not change (1x1x1 and depthwise kernels: the dims it moves have
    size 1) keep their standard strides. The gradients ATen and DepthwiseConv3d compute for them have standard strides,
    and DDP lays out its gradient buckets with the parameters' strides: a mismatch costs a copy per parameter and step
    ("Grad strides do not match bucket view strides").
    """
    model.to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 5 and p.is_contiguous():  # same element order in both layouts
                p.data = p.data.clone(memory_format=torch.contiguous_format)
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference, in eval mode, with every BatchNorm folded into the convolution before it.

    Each convolution -> BN -> activation becomes one `fused_conv.FusedConv3d`, which on the CPU also applies the
    activation, and at the end of a residual block the residual sum, as it writes its output (its docstring): one
    pass over the activations instead of two or three. The outputs equal the model's up to float rounding
    (tests/test_x3d.py). The copy cannot train (its BatchNorms are gone) and keeps the parameters' memory format; the
    model itself is not changed.
    """
    groups = {id(g): g for m in model.modules() if (g := getattr(m, "process_group", None)) is not None}
    fused = copy.deepcopy(model, memo=groups).eval()  # process groups (synchronised BN) are shared, not copied
    for block in list(fused.modules()):
        if isinstance(block, (Stem, Bottleneck, X3DHead)):
            block.fold()  # FusedConv3d computes its folded weights without gradients
    return fused


def set_bn_splits(model: nn.Module, k: int, sync_devices: int = 1) -> None:
    """Switch every sub-batch BN of `model` in place to k groups per device, or (k = 1, sync_devices > 1) to BN over
    the batches of `sync_devices` consecutive ranks; same parameters, so an optimizer stays valid.

    Every rank must make the same calls in the same order: a new device count creates its process groups (once) and
    joining a group pools running statistics, both collective. Without torch.distributed it is plain BN, with a note.
    """
    group = _sync_group(sync_devices) if sync_devices > 1 else None
    for m in model.modules():
        if isinstance(m, SubBatchNorm3d):
            m.set_splits(k, group)


_SYNC_GROUPS: dict[int, tuple[Any, Any]] = {}  # devices -> (the default group they were made from, this rank's group)


def _sync_group(devices: int) -> Any:
    """This rank's group of `devices` consecutive ranks (0..g-1, g..2g-1, ...), made once per process group."""
    if not (dist.is_available() and dist.is_initialized()):
        logger.warning("synchronised BN over %d devices needs torch.distributed; using this process's batch alone",
                       devices)
        return None
    world = dist.get_world_size()
    if world % devices:
        raise ValueError(f"synchronised BN over {devices} devices needs a world size divisible by it, got {world}")
    made_from, group = _SYNC_GROUPS.get(devices, (None, None))
    if made_from is not dist.group.WORLD:  # first use, or a new process group since
        group = dist.new_subgroups(devices)[0]  # collective: every rank creates every subgroup, in the same order
        _SYNC_GROUPS[devices] = (dist.group.WORLD, group)
    return group


def aggregate_sub_bn_stats(model: nn.Module) -> int:
    """Fold the group statistics of every sub-batch BN into its running_mean/var; returns the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, SubBatchNorm3d)]
    for m in layers:
        m.aggregate_stats()
    return len(layers)
