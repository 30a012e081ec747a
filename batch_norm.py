"""Training batch norm by groups of clips: sub-batch BN's groups, for x3d.SubBatchNorm3d (one group is plain BN).

Group g of k is the run of clips g*N/k .. (g+1)*N/k - 1 of a batch of N; x3d.X3D orders its batch so that these runs
hold PySlowFast's groups (clip i in group i mod k). Each group is normalised with its own per-channel mean and biased
variance, and its running statistics are entries g*C .. g*C + C - 1 of group-major buffers of k*C, updated as
nn.BatchNorm3d updates its own (the unbiased variance, `momentum`).

Two implementations, equal up to float rounding (tests/test_x3d.py):
- batch_norm.c (built by native.py) for float32 channels-last CPU tensors: all groups in one call, two passes over
  the activations forward and two backward, faster than ATen's channels-last kernels on the same tensors
  (benchmarks/README.md);
- ATen's batch_norm kernels, one call per group, for everything else: CUDA, other dtypes, the default layout,
  graphs compiled with torch.compile, a machine without a C compiler.
"""

from __future__ import annotations

from typing import Any

import torch

import native


def train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
          running_var: torch.Tensor, k: int, momentum: float, eps: float) -> torch.Tensor:
    """Batch norm of `x` in training, by k groups of clips, updating the (k*C) running statistics in place."""
    function = _CFunction if in_c(x, weight, bias, running_mean, running_var) else _AtenFunction
    return function.apply(x, weight, bias, running_mean, running_var, k, momentum, eps)


def in_c(x: torch.Tensor, *parameters: torch.Tensor) -> bool:
    """Whether training batch norm of `x` runs in batch_norm.c: float32 CPU tensors, `x` channels-last, the kernels
    built, and not inside a graph that torch.compile traces (which takes ATen's kernels)."""
    return (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)
            and not torch.compiler.is_compiling() and native.library_for(x, *parameters) is not None)


class _CFunction(torch.autograd.Function):
    """Training batch norm by groups of clips in batch_norm.c (float32, channels-last)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, k: int, momentum: float, eps: float) -> torch.Tensor:
        c = x.shape[1]
        rows = x.numel() // c
        if rows // k < 2:
            raise ValueError(f"batch norm in training needs more than 1 value per channel and group, got input of "
                             f"shape {tuple(x.shape)} in {k} group(s)")
        weight_, bias_ = weight.detach().contiguous(), bias.detach().contiguous()
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
        mean, invstd = x.new_empty(2, k, c).unbind()
        native.call(native.library().batch_norm_forward, x.data_ptr(), weight_.data_ptr(), bias_.data_ptr(),
                    out.data_ptr(), mean.data_ptr(), invstd.data_ptr(), running_mean.data_ptr(),
                    running_var.data_ptr(), rows, c, k, momentum, eps, torch.get_num_threads())
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.k = k
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        grad_input = torch.empty_like(x, memory_format=torch.channels_last_3d)
        grad_weight, grad_bias = x.new_empty(ctx.k, c), x.new_empty(ctx.k, c)
        weight_ = weight.detach().contiguous()
        native.call(native.library().batch_norm_backward, grad.data_ptr(), x.data_ptr(), weight_.data_ptr(),
                    mean.data_ptr(), invstd.data_ptr(), grad_input.data_ptr(), grad_weight.data_ptr(),
                    grad_bias.data_ptr(), x.numel() // c, c, ctx.k, torch.get_num_threads())
        return grad_input, grad_weight.sum(0), grad_bias.sum(0), *(None,) * 5


def dense_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for a channels-last input, else the default layout: either way a slice of the batch is dense."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class _AtenFunction(torch.autograd.Function):
    """Training batch norm of k runs of N/k consecutive clips, each with its own statistics, in the input's layout,
    by ATen's kernels.

    Run g is the slice x[g*N/k : (g+1)*N/k], dense in both layouts, so each run is one batch_norm kernel call that
    reads the input and writes its slice of the output where they lie (ATen's `out=` variants); the running
    statistics of run g are entries g*C .. g*C + C - 1 of the group-major buffers. Reshaping the batch to
    (N/k, k*C, T, H, W) instead, one batch_norm over k*C channels (PySlowFast's split_bn), copies a channels-last
    input to that layout and back, forward and backward, and was measured slower on CPU (benchmarks/README.md).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, split_mean: torch.Tensor,
                split_var: torch.Tensor, k: int, momentum: float, eps: float) -> torch.Tensor:
        fmt = dense_format(x)
        x = x.contiguous(memory_format=fmt)
        n, c = x.shape[:2]
        m = n // k
        out = torch.empty_like(x, memory_format=fmt)
        # batch_norm keeps its statistics in float32 for half-precision inputs
        saved = [x.new_empty(k, c, dtype=torch.promote_types(x.dtype, torch.float32)) for _ in range(2)]
        for g in range(k):
            rows, chans = slice(g * m, (g + 1) * m), slice(g * c, (g + 1) * c)
            torch.ops.aten.native_batch_norm.out(x[rows], weight, bias, split_mean[chans], split_var[chans], True,
                                                 momentum, eps, out=out[rows], save_mean=saved[0][g],
                                                 save_invstd=saved[1][g])
        ctx.save_for_backward(x, weight, *saved)
        ctx.k, ctx.eps, ctx.fmt = k, eps, fmt
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        n, c = x.shape[:2]
        m = n // ctx.k
        grad = grad.contiguous(memory_format=ctx.fmt)
        grad_input = torch.empty_like(x, memory_format=ctx.fmt)
        grad_weight, grad_bias = weight.new_empty(ctx.k, c), weight.new_empty(ctx.k, c)
        for g in range(ctx.k):
            rows = slice(g * m, (g + 1) * m)
            torch.ops.aten.native_batch_norm_backward.out(
                grad[rows], x[rows], weight, None, None, save_mean[g], save_invstd[g], True, ctx.eps,
                [True, True, True], out0=grad_input[rows], out1=grad_weight[g], out2=grad_bias[g])
        return grad_input, grad_weight.sum(0), grad_bias.sum(0), *(None,) * 5
