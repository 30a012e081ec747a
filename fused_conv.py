"""A convolution for inference with its BatchNorm folded in and the activation after it applied as it writes its output.

`x3d.fold_batchnorm` turns every convolution -> BatchNorm -> activation of an eval-mode X3D into one `FusedConv3d`.
In eval mode BN is an affine map per channel, y = (x - mean) / sqrt(var + eps) * gamma + beta, so conv -> BN is one
convolution with its weights scaled by gamma / sqrt(var + eps) and a bias. The activation after it (ReLU or Swish), or
ReLU(conv + residual) at the end of a residual block, is then a post-op of the convolution on the CPU: oneDNN applies
it to each block of outputs while it is still in registers (`torch.ops.mkldnn._convolution_pointwise`, the operator
torch.compile's inductor emits for the same pattern), so a layer reads and writes its activations once instead of
two or three times. oneDNN wants its weights in a blocked layout that depends on the input's shape; the layer keeps
them reordered per input shape (a handful at evaluation: the batch and the last, smaller one) instead of reordering
them at every call.

Elsewhere (CUDA, autocast to a lower precision, gradients, a graph being compiled, oneDNN off or not built in) the
same computation runs as separate PyTorch operations. Both give the eval-mode model's outputs up to float rounding
(tests/test_x3d.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("none", "relu", "swish")  # oneDNN's names of the post-ops used here
PACKED_SHAPES = 4  # reordered weights kept per layer; more input shapes than that start the cache again


class FusedConv3d(nn.Conv3d):
    """`conv` with `bn` (eval mode; None: no BN) folded in, then `activation`; with `residual=True` the forward takes
    a second tensor and returns ReLU(conv(x) + residual), `activation` then being "relu"."""

    def __init__(self, conv: nn.Conv3d, bn: nn.BatchNorm3d | None = None, activation: str = "none",
                 residual: bool = False):
        if activation not in ACTIVATIONS:
            raise ValueError(f"FusedConv3d: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if residual and activation != "relu":
            raise ValueError("FusedConv3d: a residual block ends with ReLU(conv + residual); use activation='relu'")
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.activation, self.residual = activation, residual
        with torch.no_grad():
            weight, bias = conv.weight, conv.bias if conv.bias is not None else torch.zeros_like(self.bias)
            if bn is not None:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                weight = weight * scale.view(-1, 1, 1, 1, 1)
                bias = (bias - bn.running_mean) * scale + bn.bias
            layout = torch.contiguous_format if conv.weight.is_contiguous() else torch.channels_last_3d
            self.weight = nn.Parameter(weight.clone(memory_format=layout))  # conv's memory format, as trained
            self.bias = nn.Parameter(bias.clone())
        self._packed: dict[tuple[int, ...], torch.Tensor] = {}  # input shape -> the weight in oneDNN's layout
        self._packed_version = self.weight._version  # an in-place change of the weight (load_state_dict) empties it

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (residual is not None) != self.residual:
            raise ValueError(f"FusedConv3d: residual={self.residual}, but the call "
                             f"{'passes' if residual is not None else 'does not pass'} one")
        if self._onednn(x, residual):
            args = (self._packed_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(x, *args, self.activation, [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, "relu", [], "")
        y = F.conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if residual is not None:
            y = y + residual
        if self.activation == "relu":
            return F.relu(y, inplace=True)
        return F.silu(y, inplace=True) if self.activation == "swish" else y

    def _onednn(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """Whether this call takes oneDNN's fused convolution (module docstring)."""
        return (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and (residual is None or residual.dtype == torch.float32)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and not torch.compiler.is_compiling())

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed_version != self.weight._version or len(self._packed) >= PACKED_SHAPES:
            self._packed, self._packed_version = {}, self.weight._version
        shape = tuple(x.shape)
        packed = self._packed.get(shape)
        if packed is None:
            packed = self._packed[shape] = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), self.padding, self.stride, self.dilation, self.groups, list(shape))
        return packed

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .float(): the reordered weights are stale
        self._packed = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, residual={self.residual}"
