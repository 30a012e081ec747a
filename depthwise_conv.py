"""Depthwise 3D convolution for X3D, with CPU training backwards of its own, chosen per layer and input shape.

`DepthwiseConv3d` has exactly the parameters of `nn.Conv3d(channels, channels, k, groups=channels, bias=False)`, so
checkpoints do not know it exists. Its forward is the ordinary convolution. CPU training has three backwards to choose
from (BACKWARDS): ATen's (oneDNN's); `own-input`, whose input gradient is its own and whose weight gradient is ATen's;
and `own`, whose gradients are both its own. The own input gradient of a stride-1 layer is a forward convolution with
the flipped kernel; the own gradients of float32 tensors are otherwise computed by depthwise_conv.c, which native.py
compiles at first use with the system's C compiler for the CPU it runs on. Without a compiler, strided layers take
ATen's input gradient and the own weight gradient runs as PyTorch operations, one product and sum per kernel tap
(slower; a warning says so).

Which backward is fastest depends on the CPU and on the shape (benchmarks/README.md), so the first training step of
each layer at each input shape times them on that shape and keeps the fastest; `choices()` is that table, and the
training scripts store it in their checkpoints so that a resumed run computes its gradients the same way as the run
it continues (the backwards round differently). `X3D_DEPTHWISE_BACKWARD=own`, `=own-input` or `=aten` in the
environment takes one everywhere instead (`auto`, the default, times them): two runs with the same seed then give the
same weights. CUDA, inference anywhere and graphs compiled with torch.compile run ATen's convolution.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import native

# own: own input and weight gradients; own-input: own input gradient, ATen's weight gradient; aten: ATen's backward
BACKWARDS = ("own", "own-input", "aten")
MODES = ("auto", *BACKWARDS)
TIMING_ROUNDS = 3  # per backward, after one warm-up round; the fastest round counts

_choices: dict[str, str] = {}  # layer-and-input key -> one of BACKWARDS


class _DepthwiseConv3dFunction(torch.autograd.Function):
    """Depthwise conv3d with the own input gradient and, with `own_weight`, the own weight gradient.

    Forward is the ordinary convolution. The input gradient of a stride-1 layer is a forward convolution of the output
    gradient with the flipped kernel, which oneDNN runs several times faster than ATen's depthwise input backward; a
    strided layer's comes from depthwise_conv.c (ATen's without it). The own weight gradient is depthwise_conv.c's, or
    without it a sum over the kernel taps of the gradient times the matching shifted input, in channels-last order so
    that the channel dimension is contiguous. The gradients equal ATen's (tests/test_x3d.py).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # backward then runs under the forward's autocast state
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
                own_weight: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.own_weight = stride, padding, own_weight
        return F.conv3d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad = grad.contiguous(memory_format=torch.channels_last_3d)
        grad_input = own_input_grad(grad, weight, x, stride, padding) if ctx.needs_input_grad[0] else None
        grad_weight = (own_weight_grad(grad, weight, x, stride, padding)
                       if ctx.needs_input_grad[1] and ctx.own_weight else None)
        mask = [ctx.needs_input_grad[0] and grad_input is None, ctx.needs_input_grad[1] and grad_weight is None, False]
        if any(mask):
            grad_input, grad_weight = aten_grads(grad, weight, x, stride, padding, mask, grad_input, grad_weight)
        return (None if grad_input is None else grad_input.to(x.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None)


def aten_grads(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, stride: tuple[int, ...],
               padding: tuple[int, ...], mask: list[bool], grad_input: torch.Tensor | None = None,
               grad_weight: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """ATen's input and weight gradients, those `mask` asks for; the others stay as given."""
    # under autocast the gradient comes in the autocast dtype: ATen's backward wants one dtype throughout
    aten_input, aten_weight, _ = torch.ops.aten.convolution_backward(
        grad, x.to(grad.dtype), weight.to(grad.dtype), None, list(stride), list(padding), [1, 1, 1], False, [0, 0, 0],
        weight.shape[0], mask)
    return aten_input if mask[0] else grad_input, aten_weight if mask[1] else grad_weight


def own_input_grad(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, stride: tuple[int, ...],
                   padding: tuple[int, ...]) -> torch.Tensor | None:
    """The input gradient: at stride 1 a forward convolution of the output gradient with the flipped kernel, else
    depthwise_conv.c's (float32); None where neither applies. Channels-last, as the gradient given should be."""
    grad = grad.contiguous(memory_format=torch.channels_last_3d)  # a no-op in training: backward made it so
    channels, flipped_padding = weight.shape[0], tuple(k - 1 - p for k, p in zip(weight.shape[2:], padding))
    if all(s == 1 for s in stride) and min(flipped_padding) >= 0:
        return F.conv3d(grad, weight.flip(2, 3, 4).to(grad.dtype), None, 1, flipped_padding, 1, channels)
    library = native.library_for(x, grad, weight)
    if library is None:
        return None
    grad_input = torch.empty(x.shape, dtype=x.dtype, memory_format=torch.channels_last_3d)
    weight_kc = weight.detach().reshape(channels, -1).t().contiguous()  # (taps, C): the channels contiguous
    _call(library.depthwise_input_grad, grad, weight_kc, grad_input, x.shape, grad.shape, weight.shape, stride, padding)
    return grad_input


def own_weight_grad(grad: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, stride: tuple[int, ...],
                    padding: tuple[int, ...]) -> torch.Tensor:
    """The weight gradient: depthwise_conv.c's (float32), else by taps in PyTorch."""
    grad = grad.contiguous(memory_format=torch.channels_last_3d)
    library = native.library_for(x, grad)
    if library is None:
        return weight_grad_by_taps(x, grad, weight.shape, stride, padding)
    grad_weight = torch.empty(weight.shape, dtype=torch.float32)
    _call(library.depthwise_weight_grad, x.contiguous(memory_format=torch.channels_last_3d), grad, grad_weight, x.shape,
          grad.shape, weight.shape, stride, padding)
    return grad_weight


def weight_grad_by_taps(x: torch.Tensor, grad: torch.Tensor, shape: torch.Size, stride: tuple[int, ...],
                        padding: tuple[int, ...]) -> torch.Tensor:
    """The weight gradient in PyTorch: per kernel tap, the output gradient times the shifted input, summed."""
    (pt, ph, pw), (st, sh, sw) = padding, stride
    padded = F.pad(x.permute(0, 2, 3, 4, 1), (0, 0, pw, pw, ph, ph, pt, pt))  # (N, T, H, W, C)
    g = grad.permute(0, 2, 3, 4, 1)
    t, h, w = g.shape[1:4]
    kt, kh, kw = shape[2:]
    taps = [(padded[:, a:a + st * (t - 1) + 1:st, b:b + sh * (h - 1) + 1:sh, d:d + sw * (w - 1) + 1:sw] * g)
            .sum((0, 1, 2, 3)) for a in range(kt) for b in range(kh) for d in range(kw)]
    return torch.stack(taps, 1).view(shape)


def _call(function: Any, first: torch.Tensor, second: torch.Tensor, out: torch.Tensor, x_shape: torch.Size,
          grad_shape: torch.Size, weight_shape: torch.Size, stride: tuple[int, ...], padding: tuple[int, ...]) -> None:
    """Run one of depthwise_conv.c's functions on dense float32 tensors (channels-last activations)."""
    native.call(function, first.data_ptr(), second.data_ptr(), out.data_ptr(), *x_shape, *grad_shape[2:],
                *weight_shape[2:], *stride, *padding, torch.get_num_threads())


class DepthwiseConv3d(nn.Conv3d):
    """nn.Conv3d with groups = channels and no bias, the same parameters; CPU training takes the faster backward."""

    def __init__(self, channels: int, kernel_size: tuple[int, int, int] | int, stride: tuple[int, int, int] | int = 1,
                 padding: tuple[int, int, int] | int = 0):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                and not torch.compiler.is_compiling() and (backward := backward_for(self, x)) != "aten"):
            return _DepthwiseConv3dFunction.apply(x, self.weight, self.stride, self.padding, backward == "own")
        return super().forward(x)


def mode() -> str:
    """X3D_DEPTHWISE_BACKWARD: `auto` (default: the fastest per layer and shape) or one of BACKWARDS."""
    value = os.environ.get("X3D_DEPTHWISE_BACKWARD", "auto")
    if value not in MODES:
        raise ValueError(f"X3D_DEPTHWISE_BACKWARD must be one of {', '.join(MODES)}, got {value!r}")
    return value


def backward_for(layer: DepthwiseConv3d, x: torch.Tensor) -> str:
    """The backward `layer` trains with on input `x`: the environment's, else the table's, else timed now."""
    chosen = mode()
    if chosen != "auto":
        return chosen
    layout = "cl" if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous() else "c"
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    key = (f"c{layer.in_channels} k{'x'.join(map(str, layer.kernel_size))} s{'x'.join(map(str, layer.stride))} "
           f"p{'x'.join(map(str, layer.padding))} in{'x'.join(map(str, x.shape))} {layout} {str(dtype)[6:]}")
    if key not in _choices:
        _choices[key] = fastest_backward(layer, x)
    return _choices[key]


def fastest_backward(layer: DepthwiseConv3d, x: torch.Tensor) -> str:
    """Time every backward (forward included, the same in all) of `layer` on random data shaped as `x`."""
    generator = torch.Generator().manual_seed(0)  # not the global generator: a run's random stream stays the same
    layout = torch.channels_last_3d if not x.is_contiguous() else torch.contiguous_format
    with torch.enable_grad():  # under the caller's autocast state, which every path follows
        data = torch.randn(x.shape, generator=generator).to(x.dtype).contiguous(memory_format=layout).requires_grad_()
        weight = layer.weight.detach().clone().requires_grad_()
        out = F.conv3d(data.detach(), weight.detach(), None, layer.stride, layer.padding, 1, layer.in_channels)
        grad = torch.randn(out.shape, generator=generator).to(out.dtype).contiguous(memory_format=layout)
        run = {"own": lambda: _DepthwiseConv3dFunction.apply(data, weight, layer.stride, layer.padding, True),
               "own-input": lambda: _DepthwiseConv3dFunction.apply(data, weight, layer.stride, layer.padding, False),
               "aten": lambda: F.conv3d(data, weight, None, layer.stride, layer.padding, 1, layer.in_channels)}
        best = dict.fromkeys(BACKWARDS, math.inf)
        for round_ in range(TIMING_ROUNDS + 1):
            for name in BACKWARDS:
                start = time.perf_counter()
                run[name]().backward(grad)
                if round_ > 0:
                    best[name] = min(best[name], time.perf_counter() - start)
                data.grad = weight.grad = None
    return min(BACKWARDS, key=best.__getitem__)


def choices() -> dict[str, str]:
    """The backward chosen so far for each layer and input (key: channels, kernel, stride, padding, input shape,
    layout, dtype), for a checkpoint."""
    return dict(_choices)


def load_choices(table: dict[str, str] | None) -> None:
    """Take a checkpoint's choices (they win over timing: a resumed run computes as the run it continues)."""
    for key, value in (table or {}).items():
        if value not in BACKWARDS:
            raise ValueError(f"depthwise backward choice for {key!r} must be one of {', '.join(BACKWARDS)}, "
                             f"got {value!r}")
        _choices[key] = value
