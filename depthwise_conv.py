"""Depthwise 3D convolution for X3D, with a CPU training backward of its own.

`DepthwiseConv3d` has exactly the parameters of `nn.Conv3d(channels, channels, k, groups=channels, bias=False)`, so
checkpoints do not know it exists. Its forward is the ordinary convolution; only CPU training takes the backward below
(CUDA, and inference anywhere, run ATen's convolution). Whether that backward pays depends on the CPU: it was measured
faster than oneDNN's depthwise backward on an AMD EPYC with AVX2 and slower on an Intel Xeon with AVX-512
(benchmarks/README.md). `X3D_DEPTHWISE_BACKWARD=aten` in the environment turns it off.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _DepthwiseConv3dFunction(torch.autograd.Function):
    """Depthwise conv3d whose backward avoids oneDNN's depthwise backward.

    Forward is the ordinary convolution. The input gradient of a stride-1 layer is a forward convolution with the
    flipped kernel; strided layers keep ATen's input gradient. The weight gradient sums, for each kernel tap, the
    products of the gradient with the matching shifted input, in channels-last order so that the channel dimension is
    contiguous. The gradients equal ATen's (tests/test_x3d.py).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward then runs under the forward's autocast state
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, ...],
                padding: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv3d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, channels = ctx.stride, ctx.padding, weight.shape[0]
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            flipped_padding = tuple(k - 1 - p for k, p in zip(weight.shape[2:], padding))
            if all(s == 1 for s in stride) and min(flipped_padding) >= 0:
                grad_input = F.conv3d(grad, weight.flip(2, 3, 4), None, 1, flipped_padding, 1, channels)
            else:
                grad_input = torch.ops.aten.convolution_backward(
                    grad, x, weight, None, list(stride), list(padding), [1, 1, 1], False, [0, 0, 0], channels,
                    [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            (pt, ph, pw), (st, sh, sw) = padding, stride
            padded = F.pad(x.permute(0, 2, 3, 4, 1), (0, 0, pw, pw, ph, ph, pt, pt))  # (N, T, H, W, C)
            g = grad.permute(0, 2, 3, 4, 1)
            t, h, w = g.shape[1:4]
            kt, kh, kw = weight.shape[2:]
            taps = [(padded[:, a:a + st * (t - 1) + 1:st, b:b + sh * (h - 1) + 1:sh, d:d + sw * (w - 1) + 1:sw] * g)
                    .sum((0, 1, 2, 3)) for a in range(kt) for b in range(kh) for d in range(kw)]
            grad_weight = torch.stack(taps, 1).view_as(weight)
        return grad_input, grad_weight, None, None


class DepthwiseConv3d(nn.Conv3d):
    """nn.Conv3d with groups = channels and no bias, the same parameters; CPU training takes the faster backward."""

    def __init__(self, channels: int, kernel_size: tuple[int, int, int] | int, stride: tuple[int, int, int] | int = 1,
                 padding: tuple[int, int, int] | int = 0):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                and os.environ.get("X3D_DEPTHWISE_BACKWARD", "own") != "aten"):
            return _DepthwiseConv3dFunction.apply(x, self.weight, self.stride, self.padding)
        return super().forward(x)
