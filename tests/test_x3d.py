"""X3D family: shapes, parameter counts and FLOPs per variant; sub-batch and synchronised BN; Swish; init;
channels_last; configs."""

import collections
import copy
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _triple
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import batch_norm
import depthwise_conv
import native
import x3d
from fused_conv import FusedConv3d
from x3d import (
    MATMUL_POSITIONS,
    MODELS,
    Bottleneck,
    DepthwiseConv3d,
    PointwiseConv3d,
    SubBatchNorm3d,
    Swish,
    aggregate_sub_bn_stats,
    as_matmul,
    build_model,
    build_model_from_cfg,
    default_input,
    fold_batchnorm,
    set_bn_splits,
    to_channels_last,
)

# Exact parameter counts (400 classes) and multiply-add GFLOPs of one clip at the training input (DESIGN section 3).
PARAMS = {"x3d_xs": 3_794_322, "x3d_s": 3_794_322, "x3d_m": 3_794_322, "x3d_l": 6_153_432, "x3d_xl": 11_095_904}
GFLOPS = {"x3d_xs": 0.60, "x3d_s": 1.96, "x3d_m": 4.73, "x3d_l": 18.37}


def gmacs(name: str, frames: int, crop: int) -> float:
    """Multiply-adds of one clip, counted on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = build_model(name).eval()
        clip = torch.empty(1, 3, frames, crop, crop)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(clip)
    return counter.get_total_flops() / 2 / 1e9


# ----------------------------------------------------------------------------------------------------------------------
# Every registered variant
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_variant_forward_backward_and_params(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert model.cfg.name == name and model.cfg.num_classes == 400
    clips = torch.randn(2, 3, 4, 64, 64)
    logits = model(clips)
    assert logits.shape == (2, 400)
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.head.classifier.weight.grad.abs().sum() > 0
    assert model.stages[3][0].bn_c.weight.grad.abs().sum() > 0  # zero-init gamma still learns


@pytest.mark.parametrize("name", list(MODELS))
def test_variant_head_shapes(name):
    with torch.device("meta"):
        clip_model = build_model(name, num_classes=7)
        frame_model = build_model(name, num_classes=7, head="frame")
        clips = torch.empty(3, 3, 5, 96, 64)
    assert clip_model(clips).shape == (3, 7)
    assert frame_model(clips).shape == (3, 7, 5)
    assert clip_model.forward_features(clips).shape[2:] == (5, 3, 2)  # T kept, H and W / 32
    assert clip_model.state_dict().keys() == frame_model.state_dict().keys()  # both heads load the same weights


@pytest.mark.parametrize("name", list(GFLOPS))
def test_gflops_at_training_input(name):
    spec = default_input(name)
    measured = gmacs(name, spec["frames"], spec["train_crop"])
    assert measured == pytest.approx(GFLOPS[name], rel=0.01)


def test_xl_matches_paper_cost_at_test_crop():
    # The paper gives 48.4 GFLOPs per 16x356² view for X3D-XL; multiple-of-8 rounding of the widths reproduces it.
    assert gmacs("x3d_xl", 16, 356) == pytest.approx(48.4, rel=0.01)


def test_default_inputs_and_unknown_name():
    assert default_input("x3d_xs") == dict(frames=4, sampling_rate=12, train_crop=160, train_jitter=(182, 228),
                                           test_crop=182)
    assert default_input("x3d_s")["frames"] == 13 and default_input("x3d_s")["sampling_rate"] == 6
    assert default_input("x3d_m") == dict(frames=16, sampling_rate=5, train_crop=224, train_jitter=(256, 320),
                                          test_crop=256)
    assert default_input("x3d_l")["train_crop"] == 312 and default_input("x3d_xl")["test_crop"] == 356
    with pytest.raises(ValueError, match="unknown model 'x3d_q'"):
        build_model("x3d_q")


def test_config_round_trip_through_json():
    model = build_model("x3d_s", num_classes=9, dropout=0.3, head="frame")
    cfg = json.loads(json.dumps(dataclasses.asdict(model.cfg)))  # what a log or checkpoint keeps
    rebuilt = build_model_from_cfg(cfg)
    assert rebuilt.cfg == model.cfg
    assert rebuilt.head.dropout.p == 0.3 and rebuilt.head.per_frame
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert build_model_from_cfg({"name": "x3d_l", "num_classes": 3}).cfg.depth_factor == 5.0
    with pytest.raises(ValueError, match="unknown fields"):
        build_model_from_cfg({**cfg, "bn_splits": 4})


def test_initialisation():
    model = build_model("x3d_xs")
    for stage in model.stages:
        for block in stage:
            assert (block.bn_c.weight == 0).all() and (block.bn_a.weight == 1).all() and (block.bn_c.bias == 0).all()
    assert (model.stem.bn.weight == 1).all() and (model.stages[0][0].shortcut_bn.weight == 1).all()
    assert model.head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.05)
    conv = model.stages[2][1].conv_a.weight  # Kaiming fan_out: std = sqrt(2 / out_channels)
    assert conv.std().item() == pytest.approx((2 / conv.shape[0]) ** 0.5, rel=0.05)


# ----------------------------------------------------------------------------------------------------------------------
# Pointwise convolution
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(2, 4, 4), (4, 8, 8)])  # 32 positions per clip: a matrix product; 256: oneDNN's
@pytest.mark.parametrize("stride", [(1, 1, 1), (1, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_equals_conv3d(size, stride, channels_last, monkeypatch):
    """PointwiseConv3d's outputs and gradients are nn.Conv3d's, as a matrix product and as a convolution, and its
    weight gradient keeps the weight's strides (DDP's gradient buckets follow them)."""
    torch.manual_seed(0)
    layer = PointwiseConv3d(24, 40, stride)
    reference = nn.Conv3d(24, 40, 1, stride=stride, bias=False)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 24, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    calls = []
    monkeypatch.setattr(x3d, "as_matmul", lambda *a: calls.append(1) or as_matmul(*a))
    outputs, grads = [], []
    for module in (layer, reference):
        x_ = x.clone().requires_grad_()
        out = module(x_)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        outputs.append(out)
        grads.append((x_.grad, module.weight.grad))
    out_positions = size[0] * (size[1] // stride[1]) * (size[2] // stride[2])
    assert bool(calls) == (out_positions <= MATMUL_POSITIONS)
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    if calls:
        assert layer.weight.grad.stride() == layer.weight.stride()


# Depthwise convolution
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel, stride, padding", [(3, (1, 1, 1), 1), (3, (1, 2, 2), 1), ((5, 1, 1), 1, (2, 0, 0))])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backward", ["own", "own-input"])
def test_depthwise_conv_gradients_equal_aten(kernel, stride, padding, channels_last, backward, monkeypatch):
    """DepthwiseConv3d's CPU backwards give ATen's gradients: 3x3x3 with and without stride, the stem's 5x1x1."""
    monkeypatch.setenv("X3D_DEPTHWISE_BACKWARD", backward)
    torch.manual_seed(0)
    conv = DepthwiseConv3d(12, kernel, stride=stride, padding=padding)
    ref = nn.Conv3d(12, 12, kernel, stride=stride, padding=padding, groups=12, bias=False)
    ref.weight.data.copy_(conv.weight.data)
    x = torch.randn(3, 12, 5, 9, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    conv, ref = conv.double(), ref.double()
    outs = []
    for module in (conv, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        if module is conv:  # the custom backward is what is under test, not a silent fallback to ATen's
            assert type(y.grad_fn).__name__ == "_DepthwiseConv3dFunctionBackward"
        upstream = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
        y.backward(upstream)
        outs.append((y, xi.grad, module.weight.grad))
    for got, want in zip(outs[0], outs[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a: conv(a), x[:1, :, :3, :5, :5].clone().requires_grad_())
    with torch.no_grad():  # inference takes the ordinary convolution
        torch.testing.assert_close(conv(x), ref(x))


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
@pytest.mark.parametrize("kernel, stride, padding, shape", [
    (3, (1, 1, 1), 1, (3, 12, 5, 9, 11)), (3, (1, 2, 2), 1, (3, 12, 5, 9, 11)),
    ((5, 1, 1), 1, (2, 0, 0), (2, 9, 6, 5, 4)), ((3, 2, 3), (2, 2, 3), (0, 1, 2), (2, 5, 7, 8, 10)),
    (3, 1, 3, (1, 19, 3, 4, 4)), (3, (1, 2, 2), 1, (2, 40, 2, 3, 3)), (3, 1, 1, (1, 54, 2, 3, 5))])
@pytest.mark.parametrize("threads", [1, 3])
def test_depthwise_conv_c_gradients_equal_aten(kernel, stride, padding, shape, threads, monkeypatch):
    """depthwise_conv.c (float32; built here with the system's compiler) gives ATen's gradients: strides, paddings
    wider than the kernel's reach, even kernels, more threads than rows of some layers; so do the PyTorch fallbacks."""
    monkeypatch.setenv("X3D_DEPTHWISE_BACKWARD", "own")
    assert native.library() is not None
    torch.manual_seed(0)
    conv = DepthwiseConv3d(shape[1], kernel, stride=stride, padding=padding)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    upstream = torch.randn_like(F.conv3d(x, conv.weight, None, conv.stride, conv.padding, 1, shape[1]))
    xd, wd = x.double().requires_grad_(), conv.weight.detach().double().requires_grad_()  # the reference, in float64
    F.conv3d(xd, wd, None, conv.stride, conv.padding, 1, shape[1]).backward(upstream.double())
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for in_c in (True, False):
        monkeypatch.setattr(native, "enabled", in_c)
        conv.weight.grad = None
        xi = x.clone().requires_grad_()
        y = conv(xi)
        assert type(y.grad_fn).__name__ == "_DepthwiseConv3dFunctionBackward"
        y.backward(upstream)
        torch.testing.assert_close(xi.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv.weight.grad.double(), wd.grad, rtol=1e-5, atol=1e-4)
        # called on tensors in the default layout, the gradients come out the same
        args = (upstream.contiguous(), conv.weight, x.contiguous(), conv.stride, conv.padding)
        torch.testing.assert_close(depthwise_conv.own_weight_grad(*args).double(), wd.grad, rtol=1e-5, atol=1e-4)
        if (grad_input := depthwise_conv.own_input_grad(*args)) is not None:
            torch.testing.assert_close(grad_input.double(), xd.grad, rtol=1e-5, atol=1e-5)


def test_c_kernels_without_a_c_compiler(monkeypatch):
    """A compiler that fails leaves the PyTorch paths, with a warning that names it."""
    monkeypatch.setenv("CC", "false")
    with pytest.warns(UserWarning, match=r"\(depthwise_conv.c, batch_norm.c\) did not build with 'false'"):
        assert native.library.__wrapped__() is None
    monkeypatch.setenv("CC", "/no/such/compiler")
    with pytest.warns(UserWarning, match="did not build with '/no/such/compiler'"):
        assert native.library.__wrapped__() is None


def test_c_kernels_share_pytorchs_openmp_runtime(monkeypatch):
    """Built with -fopenmp, the kernels use the libgomp PyTorch has loaded: one runtime, one pool of threads."""
    maps = ("7f5e-7f5f r-xp 00000 08:01 12 /env/torch/lib/libgomp.so.1\n"
            "7f6e-7f6f r-xp 00000 08:01 13 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n"
            "7f7e-7f7f r-xp 00000 08:01 14 /conda/lib/libiomp5.so\n"
            "7f8e-7f8f r-xp 00000 08:01 15 /conda/lib/libomp.so\n"
            "7f9e-7f9f r-xp 00000 08:01 16 /env/lib/libgompertz.so\n"
            "7fae-7faf rw-p 00000 00:00 0 \n")
    assert native.openmp_runtimes(maps) == {"/env/torch/lib/libgomp.so.1", "/conda/lib/libiomp5.so",
                                            "/conda/lib/libomp.so", "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0"}
    if not native.openmp_runtimes() or native.library() is None:
        pytest.skip("needs /proc/self/maps and a C compiler")
    # In a fresh process (here other libraries, scikit-learn's, have brought runtimes of their own):
    check = "import native; old = native.openmp_runtimes(); native.library(); print(native.openmp_runtimes() - old)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                            cwd=Path(native.__file__).parent)
    assert result.returncode == 0 and result.stdout.strip() == "set()", result.stderr
    # Where PyTorch runs on another runtime, loading the kernels adds libgomp: a warning names both.
    mapped = iter([{"/torch/lib/libiomp5.so"}, {"/torch/lib/libiomp5.so", "/usr/lib/libgomp.so.1"}])
    monkeypatch.setattr(native, "openmp_runtimes", lambda: next(mapped))
    with pytest.warns(UserWarning, match=r"own \(/usr/lib/libgomp.so.1\) next to PyTorch.s \(/torch/lib/libiomp5"):
        assert native.library.__wrapped__() is not None


def test_depthwise_backward_can_be_turned_off(monkeypatch):
    conv = DepthwiseConv3d(4, 3, padding=1)
    x = torch.randn(1, 4, 3, 5, 5, requires_grad=True)
    assert type(conv(x).grad_fn).__name__ == "_DepthwiseConv3dFunctionBackward"
    monkeypatch.setenv("X3D_DEPTHWISE_BACKWARD", "aten")
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"


def test_depthwise_backward_is_timed_per_layer_and_shape_and_kept(monkeypatch):
    """`auto` times both backwards at the first training step of each layer and input shape, keeps the faster in the
    table a checkpoint stores, and a loaded table wins over timing; inference and other shapes are left alone."""
    monkeypatch.setenv("X3D_DEPTHWISE_BACKWARD", "auto")
    monkeypatch.setattr(depthwise_conv, "_choices", {})
    timed = []
    real = depthwise_conv.fastest_backward
    monkeypatch.setattr(depthwise_conv, "fastest_backward", lambda layer, x: timed.append(x.shape) or real(layer, x))
    conv = DepthwiseConv3d(4, 3, padding=1)
    x = torch.randn(2, 4, 3, 5, 5).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    conv(x).sum().backward()
    conv(x).sum().backward()
    with torch.no_grad():
        conv(x)
    assert timed == [x.shape]  # timed once, then taken from the table
    (key, choice), = depthwise_conv.choices().items()
    assert key == "c4 k3x3x3 s1x1x1 p1x1x1 in2x4x3x5x5 cl float32" and choice in depthwise_conv.BACKWARDS

    other = "aten" if choice != "aten" else "own"
    depthwise_conv.load_choices({key: other})  # a resumed run's checkpoint
    want = {"own": "_DepthwiseConv3dFunctionBackward", "aten": "ConvolutionBackward0"}[other]
    assert type(conv(x).grad_fn).__name__ == want and timed == [x.shape]
    conv(x[:1]).sum().backward()  # another batch size: timed afresh
    assert len(timed) == 2 and len(depthwise_conv.choices()) == 2
    with pytest.raises(ValueError, match="must be one of own, own-input, aten, got 'fast'"):
        depthwise_conv.load_choices({key: "fast"})
    monkeypatch.setenv("X3D_DEPTHWISE_BACKWARD", "oneDNN")
    with pytest.raises(ValueError, match="must be one of auto, own, own-input, aten, got 'oneDNN'"):
        conv(x)


@pytest.mark.parametrize("backward", ["own", "own-input"])
def test_depthwise_conv_under_cpu_autocast(backward, monkeypatch):
    """Under bf16 autocast the custom backwards return gradients in the parameters' dtype, close to fp32's."""
    monkeypatch.setenv("X3D_DEPTHWISE_BACKWARD", backward)
    torch.manual_seed(0)
    conv = DepthwiseConv3d(8, 3, padding=1)
    x = torch.randn(2, 8, 4, 6, 6)
    grads = []
    for enabled in (False, True):
        conv.weight.grad = None
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            y = conv(xi)
        y.float().square().sum().backward()
        grads.append((xi.grad, conv.weight.grad))
    for want, got in zip(*grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


# ----------------------------------------------------------------------------------------------------------------------
# Swish
# ----------------------------------------------------------------------------------------------------------------------
def test_swish_values_gradient_and_saved_memory():
    x = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    assert torch.allclose(Swish()(x), x * torch.sigmoid(x))
    assert torch.autograd.gradcheck(Swish(), (x,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        Swish()(x.float())
    assert len(saved) == 1  # only the input; x * sigmoid(x) through autograd would also keep sigmoid(x)


# ----------------------------------------------------------------------------------------------------------------------
# Sub-batch BatchNorm
# ----------------------------------------------------------------------------------------------------------------------
def _random_affine(bn: nn.BatchNorm3d) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()


@pytest.mark.parametrize(("channels_last", "momentum"), [(False, 0.1), (True, 0.1), (False, None)])
def test_sub_bn_training_equals_independent_bn_per_group(channels_last, momentum):
    # momentum=None is the cumulative average that precise BN uses
    torch.manual_seed(0)
    k, channels = 4, 6
    bn = SubBatchNorm3d(channels, num_splits=k, momentum=momentum)
    _random_affine(bn)
    groups = [nn.BatchNorm3d(channels, momentum=momentum) for _ in range(k)]
    for g in groups:
        g.load_state_dict(bn.state_dict())  # plain BN keys
    for _ in range(3):
        x = torch.randn(8, channels, 2, 3, 3) * torch.arange(1.0, 9.0).view(8, 1, 1, 1, 1) + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = bn(x)
        for g in range(k):  # group g: the run of samples 2g, 2g + 1 (the model orders its batch, see below)
            torch.testing.assert_close(out[2 * g:2 * g + 2], groups[g](x[2 * g:2 * g + 2]))
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last_3d)

    bn.eval()  # folds the group statistics: law of total variance
    means = torch.stack([g.running_mean for g in groups])
    variances = torch.stack([g.running_var for g in groups])
    mean = means.mean(0)
    var = variances.mean(0) + (means - mean).square().mean(0)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    x = torch.randn(3, channels, 2, 3, 3)
    torch.testing.assert_close(bn(x), F.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps))


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_groups_clip_i_with_clips_i_mod_k(channels_last):
    """In training with k splits, every clip is normalised with the clips of its group i mod k (PySlowFast's groups):
    the model's outputs on the whole batch equal its outputs on each group alone with plain BN, and so do the
    gradients. In float64: BN over two clips at the last stage's 1x1 pixels amplifies rounding (float32's would swamp
    the comparison; float64's, from products summed in another order in a batch of 6 than of 2, reaches 1e-7 of a
    gradient)."""
    torch.manual_seed(0)
    k = 3
    model = build_model("x3d_xs", num_classes=5, dropout=0.0).double()
    if channels_last:
        model = to_channels_last(model)
    for m in model.modules():
        if isinstance(m, SubBatchNorm3d):
            _random_affine(m)
    x = torch.randn(6, 3, 2, 32, 32, dtype=torch.float64) * torch.arange(1.0, 7.0).view(6, 1, 1, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    reference = copy.deepcopy(model).train()
    set_bn_splits(model.train(), k)
    out = model(x)
    out.sum().backward()
    expected = torch.empty_like(out)
    for g in range(k):
        y = reference(x[g::k])
        y.sum().backward()  # parameter gradients add up over the groups, as over one batch
        expected[g::k] = y.detach()
    torch.testing.assert_close(out, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6, msg=name)


def test_grouped_batch_norm_gradients_and_half_precision_inputs():
    """The grouped kernel's backward against numerical gradients (float64), and a bfloat16 input with float32
    parameters (what autocast feeds it) against float32."""
    torch.manual_seed(0)
    k, c = 2, 3
    x = torch.randn(4, c, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(c, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True)

    def grouped(x, weight, bias):
        mean, var = torch.zeros(k * c, dtype=torch.float64), torch.ones(k * c, dtype=torch.float64)
        return batch_norm._AtenFunction.apply(x, weight, bias, mean, var, k, 0.1, 1e-5)

    assert torch.autograd.gradcheck(grouped, (x, weight, bias))
    bn = SubBatchNorm3d(c, num_splits=k)
    _random_affine(bn)
    x32 = torch.randn(4, c, 2, 3, 3).contiguous(memory_format=torch.channels_last_3d)
    half = bn(x32.bfloat16())
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(half.float(), bn(x32), rtol=0.05, atol=0.05)


@pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None, reason="no C compiler")
@pytest.mark.parametrize("shape, k", [((8, 6, 2, 3, 3), 1), ((8, 6, 2, 3, 3), 4), ((4, 1, 1, 2, 3), 2),
                                      ((6, 70, 3, 5, 4), 3), ((2, 24, 4, 20, 20), 1)])
@pytest.mark.parametrize("threads", [1, 3])
def test_batch_norm_c_equals_float64(shape, k, threads, monkeypatch):
    """batch_norm.c (float32, channels-last) against per-group batch norm in float64: outputs, the input, weight and
    bias gradients, and the running statistics, with a mean far from zero (no cancellation in the variance), one to
    70 channels, groups of one clip, more threads than some tensors are given."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    n, c = shape[:2]
    spread = torch.rand(c).view(1, c, 1, 1, 1) * 3 + 0.5
    x = (torch.randn(shape) * spread + 50).contiguous(memory_format=torch.channels_last_3d)
    upstream = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
    weight, bias = (torch.rand(c) + 0.5).requires_grad_(), torch.randn(c).requires_grad_()
    running_mean, running_var = torch.randn(k * c), torch.rand(k * c) + 0.5
    assert batch_norm.in_c(x, weight, bias)
    xi = x.clone().requires_grad_()
    means, variances = running_mean.clone(), running_var.clone()
    out = batch_norm.train(xi, weight, bias, means, variances, k, 0.1, 1e-5)
    assert type(out.grad_fn).__name__ == "_CFunctionBackward"
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    out.backward(upstream)

    xd, wd, bd = x.double().requires_grad_(), weight.detach().double().requires_grad_(), bias.detach().double()
    bd.requires_grad_()
    m = n // k
    expected = torch.cat([F.batch_norm(xd[g * m:(g + 1) * m], running_mean[g * c:(g + 1) * c].double(),
                                       running_var[g * c:(g + 1) * c].double(), wd, bd, True, 0.1, 1e-5)
                          for g in range(k)])
    expected.backward(upstream.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xi.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weight.grad.double(), wd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad.double(), bd.grad, rtol=1e-5, atol=1e-4)
    groups = xd.detach().view(k, m, c, -1).transpose(1, 2).reshape(k, c, -1)
    torch.testing.assert_close(means, (0.9 * running_mean.double() + 0.1 * groups.mean(-1).flatten()).float())
    torch.testing.assert_close(variances, (0.9 * running_var.double() + 0.1 * groups.var(-1).flatten()).float())


def test_batch_norm_c_only_where_it_applies(monkeypatch):
    """batch_norm.c takes float32 channels-last CPU inputs while the kernels are enabled; the rest takes ATen's
    kernels; a group of one value per channel is refused as nn.BatchNorm3d refuses it."""
    x = torch.randn(4, 3, 2, 2, 2)
    weight, bias = torch.ones(3), torch.zeros(3)
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    assert batch_norm.in_c(cl, weight, bias)
    assert not batch_norm.in_c(x, weight, bias)  # the default layout
    assert not batch_norm.in_c(cl.double(), weight.double(), bias.double())
    assert not batch_norm.in_c(cl, weight.double())
    monkeypatch.setattr(native, "enabled", False)
    assert not batch_norm.in_c(cl, weight, bias)
    bn = SubBatchNorm3d(3)
    assert type(bn(cl.requires_grad_()).grad_fn).__name__ == "NativeBatchNormBackward0"
    monkeypatch.setattr(native, "enabled", True)
    assert type(bn(cl).grad_fn).__name__ == "_CFunctionBackward"
    with pytest.raises(ValueError, match="more than 1 value per channel and group"):
        bn(torch.randn(1, 3, 1, 1, 1).contiguous(memory_format=torch.channels_last_3d))


def test_sub_bn_channels_last_input_equals_contiguous():
    """A channels_last_3d input (what training feeds) gives a contiguous input's outputs, gradients and group
    statistics, and keeps its layout."""
    torch.manual_seed(0)
    k, channels = 4, 6
    fused, strided = SubBatchNorm3d(channels, num_splits=k), SubBatchNorm3d(channels, num_splits=k)
    _random_affine(fused)
    strided.load_state_dict(fused.state_dict())
    for _ in range(2):
        x = torch.randn(8, channels, 2, 3, 3) * torch.arange(1.0, 9.0).view(8, 1, 1, 1, 1) + 1
        grad = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(), x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
        out_a, out_b = fused(xa), strided(xb)
        assert out_b.is_contiguous(memory_format=torch.channels_last_3d)
        (out_a * grad).sum().backward()
        (out_b * grad).sum().backward()
        torch.testing.assert_close(out_b, out_a)
        torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(strided.weight.grad, fused.weight.grad)
    torch.testing.assert_close(strided.bias.grad, fused.bias.grad)
    torch.testing.assert_close(strided.split_mean, fused.split_mean)
    torch.testing.assert_close(strided.split_var, fused.split_var)


def test_sub_bn_with_one_split_is_batchnorm3d():
    torch.manual_seed(0)
    ours, ref = SubBatchNorm3d(5), nn.BatchNorm3d(5)
    _random_affine(ours)
    ref.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for _ in range(3):
        x = torch.randn(6, 5, 2, 4, 4) * 2 + 0.5
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)


def test_sub_bn_batch_not_divisible_by_splits():
    bn = SubBatchNorm3d(3, num_splits=4)
    with pytest.raises(ValueError, match="batch of 6 clips cannot be split into 4 equal groups"):
        bn(torch.randn(6, 3, 1, 2, 2))
    bn.eval()
    assert bn(torch.randn(6, 3, 1, 2, 2)).shape == (6, 3, 1, 2, 2)  # eval uses the pooled statistics, any batch


def test_sub_bn_state_dict_is_plain_and_never_stale():
    torch.manual_seed(0)
    model = build_model("x3d_xs", num_classes=5, bn_splits=4)
    assert model.state_dict().keys() == build_model("x3d_xs", num_classes=5).state_dict().keys()
    assert not any("split" in key for key in model.state_dict())
    model(torch.randn(8, 3, 2, 32, 32))
    bn = model.stages[1][0].bn_b
    means = bn.split_mean.view(4, -1).clone()
    variances = bn.split_var.view(4, -1).clone()
    saved = model.state_dict()  # mid-training checkpoint: must hold the folded statistics
    torch.testing.assert_close(saved["stages.1.0.bn_b.running_mean"], means.mean(0))
    torch.testing.assert_close(saved["stages.1.0.bn_b.running_var"],
                               variances.mean(0) + (means - means.mean(0)).square().mean(0))
    assert not torch.equal(saved["stem.bn.running_mean"], torch.zeros(24))
    assert aggregate_sub_bn_stats(model) == len([m for m in model.modules() if isinstance(m, nn.BatchNorm3d)])


def test_set_bn_splits_keeps_parameters_and_statistics():
    torch.manual_seed(0)
    model = build_model("x3d_xs", num_classes=5, bn_splits=4)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    model(torch.randn(8, 3, 2, 32, 32)).sum().backward()
    optimizer.step()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_bn_splits(model, 2)
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert model.stem.bn.num_splits == 2 and model.stem.bn.split_mean.shape == (48,)
    for key, value in model.state_dict().items():  # carried over: the aggregate of tiled statistics is unchanged
        torch.testing.assert_close(value, before[key])
    model.train()
    optimizer.zero_grad()
    model(torch.randn(2, 3, 2, 32, 32)).sum().backward()  # 2 clips now split into 2 groups
    optimizer.step()
    set_bn_splits(model, 1)
    assert model.stem.bn.split_mean is None
    model(torch.randn(3, 3, 2, 32, 32))


def test_trained_with_four_splits_reloads_with_one(tmp_path):
    torch.manual_seed(0)
    model = build_model("x3d_xs", num_classes=6, bn_splits=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        clips, labels = torch.randn(8, 3, 4, 32, 32), torch.randint(0, 6, (8,))
        optimizer.zero_grad()
        F.cross_entropy(model(clips), labels).backward()
        optimizer.step()
    torch.save(model.state_dict(), tmp_path / "w.pt")  # saved while still in training mode
    model.eval()
    clips = torch.randn(3, 3, 4, 32, 32)
    with torch.no_grad():
        expected = model(clips)
    assert expected.std(0).mean() > 1e-4  # predictions differ between clips (stale statistics make them collapse)

    reloaded = build_model("x3d_xs", num_classes=6)
    reloaded.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(clips), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(clips), expected, rtol=0, atol=0)  # saving changed nothing


def test_resumed_model_continues_exactly_like_uninterrupted_one():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 2, 32, 32), torch.randint(0, 5, (4,))) for _ in range(4)]

    def train(model, optimizer, steps):
        for clips, labels in steps:
            optimizer.zero_grad()
            F.cross_entropy(model(clips), labels).backward()
            optimizer.step()

    model = build_model("x3d_xs", num_classes=5, dropout=0.0, bn_splits=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, optimizer, batches[:2])
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})  # as on disk
    resumed = build_model("x3d_xs", num_classes=5, dropout=0.0, bn_splits=2)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(model, optimizer, batches[2:])
    train(resumed, resumed_optimizer, batches[2:])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_channels_last_model_equals_contiguous():
    torch.manual_seed(0)
    model = build_model("x3d_xs", num_classes=5, bn_splits=2)
    clips = torch.randn(4, 3, 4, 64, 64)
    cl_model = build_model("x3d_xs", num_classes=5, bn_splits=2).to(memory_format=torch.channels_last_3d)
    cl_model.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    train_out = model(clips)
    torch.manual_seed(1)  # same dropout mask
    cl_train_out = cl_model(clips.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(cl_train_out, train_out, rtol=1e-4, atol=1e-5)
    model.eval(), cl_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cl_model(clips.contiguous(memory_format=torch.channels_last_3d)), model(clips),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head, channels_last", [("clip", True), ("frame", False)])
def test_folded_batchnorm_equals_the_model(head, channels_last):
    """fold_batchnorm's copy has no BatchNorm left and gives the eval-mode outputs, trained statistics and all."""
    torch.manual_seed(0)
    model = build_model("x3d_xs", num_classes=7, head=head, bn_splits=2)
    if channels_last:
        model = to_channels_last(model)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    with torch.no_grad():  # non-trivial BN statistics and affine parameters everywhere
        for _ in range(2):
            model(torch.randn(4, 3, 4, 64, 64).contiguous(memory_format=layout))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    folded = fold_batchnorm(model)
    assert model.training and not folded.training  # the model is left as it was
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    assert folded.stages[0][0].conv_b.bias is not None and model.stages[0][0].conv_b.bias is None
    stem_weights = (model.stem.conv_s.weight, folded.stem.conv_s.weight)
    assert [w.is_contiguous() for w in stem_weights] == [not channels_last] * 2  # the memory format is kept
    blocks = sum(isinstance(m, Bottleneck) for m in folded.modules())  # 26, the first of each stage projected
    assert sum(isinstance(m, FusedConv3d) for m in folded.modules()) == 2 + 3 * blocks + 4 + 1  # stem, blocks, head
    clips = torch.randn(3, 3, 4, 64, 64).contiguous(memory_format=layout)
    model.eval()
    with torch.inference_mode(), _OpCounter() as ops:
        want, got = model(clips), folded(clips)
    assert got.shape == want.shape == ((3, 7) if head == "clip" else (3, 7, 4))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ops.counts["mkldnn._convolution_pointwise.default"] == 2 + 2 * blocks + 4 + 1  # oneDNN's, fused
    assert ops.counts["mkldnn._convolution_pointwise.binary"] == blocks  # each block's ReLU(conv_c + shortcut)
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False), _OpCounter() as ops:
        torch.testing.assert_close(folded(clips), want, rtol=1e-4, atol=1e-4)  # the same as PyTorch operations
    assert not any(name.startswith("mkldnn.") for name in ops.counts)


class _OpCounter(TorchDispatchMode):
    """Counts the ATen (and other) operators called inside it, by name."""

    def __enter__(self):
        self.counts = collections.Counter()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation, residual", [("none", False), ("relu", False), ("swish", False), ("relu", True)])
@pytest.mark.parametrize("kernel, stride, groups", [(1, 1, 1), (1, 2, 1), (3, 2, 16), (3, 1, 16), ((5, 1, 1), 1, 16)])
def test_fused_conv_equals_conv_bn_activation(activation, residual, kernel, stride, groups):
    """FusedConv3d == conv -> BN (eval) -> activation, or ReLU(conv -> BN + residual), in both layouts, oneDNN's fused
    path and PyTorch's; its weights reordered for one input shape are reordered again after load_state_dict."""
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, kernel, stride=(1, stride, stride), padding=tuple(k // 2 for k in _triple(kernel)),
                     groups=groups, bias=False)
    bn = nn.BatchNorm3d(16).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    fused = FusedConv3d(conv, bn, activation, residual)
    act = {"none": nn.Identity(), "relu": nn.ReLU(), "swish": nn.SiLU()}[activation]
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        x = torch.randn(2, 16, 4, 12, 12).contiguous(memory_format=layout)
        with torch.no_grad():
            out = bn(conv(x))
            other = torch.randn(out.shape).contiguous(memory_format=layout) if residual else None
            want = act(out + other) if residual else act(out)
            for onednn in (True, False):
                with torch.backends.mkldnn.flags(enabled=onednn):
                    torch.testing.assert_close(fused(x, other) if residual else fused(x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # new weights, same module: the reordered copies must not outlive them
        fused.load_state_dict({"weight": fused.weight * 2, "bias": fused.bias})
        with torch.backends.mkldnn.flags(enabled=False):
            want = fused(x, other) if residual else fused(x)
        torch.testing.assert_close(fused(x, other) if residual else fused(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        fused(x) if residual else fused(x, x)


# ----------------------------------------------------------------------------------------------------------------------
# Synchronised BatchNorm: gloo processes on parts of a batch == one process's plain BN on the whole batch
# ----------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(fn, world: int, *args) -> None:
    mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, start_method="fork", join=True)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _finish() -> None:
    """Leave together: rank 0 hosts the store, and a rank still making its subgroup loses it if rank 0 exits."""
    dist.barrier()
    dist.destroy_process_group()


def _sync_bn_steps(bn: nn.Module, inputs: list[torch.Tensor], weights: list[torch.Tensor]) -> list[dict]:
    """Training steps of (out · w).sum(): outputs, input and parameter gradients and statistics after each step."""
    results = []
    for x, w in zip(inputs, weights):
        x = x.clone().requires_grad_()
        bn.zero_grad()
        out = bn(x)
        (out * w).sum().backward()
        results.append({"out": out.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad.clone(),
                        "bias_grad": bn.bias.grad.clone(), "running_mean": bn.running_mean.clone(),
                        "running_var": bn.running_var.clone(), "channels_last": out.is_contiguous(
                            memory_format=torch.channels_last_3d) and not out.is_contiguous()})
    return results


def _sync_bn_data(steps: int = 3, clips: int = 6, channels: int = 5):
    """Float64 clips (the union batch) and loss weights of each step; the third step is channels_last."""
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(clips, channels, 2, 3, 3, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(steps)]
    inputs[-1] = inputs[-1].contiguous(memory_format=torch.channels_last_3d)
    return inputs, [torch.randn(clips, channels, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(steps)]


def _sync_bn_module(momentum: float | None = 0.1) -> SubBatchNorm3d:
    torch.manual_seed(0)
    bn = SubBatchNorm3d(5, momentum=momentum)
    _random_affine(bn)
    return bn.double()


def _sync_bn_worker(rank, world, port, devices, out_dir):
    _init(rank, world, port)
    inputs, weights = _sync_bn_data()
    per_rank = inputs[0].shape[0] // devices  # consecutive ranks share a BN: rank r holds one part of its group's
    part = slice((rank % devices) * per_rank, (rank % devices + 1) * per_rank)
    model = nn.Sequential(_sync_bn_module())
    bn = model[0]
    with torch.no_grad():  # different statistics per rank, pooled when the group is joined
        bn.running_mean.fill_(rank)
        bn.running_var.fill_(1 + rank)
    set_bn_splits(model, 1, sync_devices=devices)
    pooled = (bn.running_mean.clone(), bn.running_var.clone())
    set_bn_splits(model, 1, sync_devices=devices)  # the same group again: nothing pooled, nothing created
    same_group = bn.process_group
    set_bn_splits(model, 1, sync_devices=devices)
    # Each group normalises its own union: the second group's clips are the first's scaled by 2.
    scale = 1 + rank // devices
    steps = _sync_bn_steps(bn, [x[part] * scale for x in inputs], [w[part] for w in weights])
    bn.eval()
    with torch.no_grad():
        eval_out = bn(inputs[0][part])
    torch.save({"pooled": pooled, "steps": steps, "eval_out": eval_out, "keys": list(model.state_dict()),
                "same_group": bn.process_group is same_group, "repr": repr(bn)}, os.path.join(out_dir, f"{rank}.pt"))
    _finish()


@pytest.mark.parametrize(("world", "devices"), [(2, 2), (4, 2)])
def test_sync_bn_equals_plain_bn_on_the_union_batch(tmp_path, world, devices):
    _run_ranks(_sync_bn_worker, world, devices, str(tmp_path))
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    inputs, weights = _sync_bn_data()
    per_rank = inputs[0].shape[0] // devices
    for first in range(0, world, devices):
        scale = 1 + first // devices
        group = results[first:first + devices]
        ref = _sync_bn_module()
        with torch.no_grad():  # from the statistics the group pooled on joining
            ref.running_mean.copy_(group[0]["pooled"][0])
            ref.running_var.copy_(group[0]["pooled"][1])
        expected = _sync_bn_steps(ref, [x * scale for x in inputs], weights)
        for step, want in enumerate(expected):
            for i, got in enumerate(r["steps"][step] for r in group):
                part = slice(i * per_rank, (i + 1) * per_rank)
                torch.testing.assert_close(got["out"], want["out"][part], rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(got["x_grad"], want["x_grad"][part], rtol=1e-10, atol=1e-10)
                # Running statistics: the same update on every rank, that of BN on the union batch.
                torch.testing.assert_close(got["running_mean"], want["running_mean"], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(got["running_var"], want["running_var"], rtol=1e-10, atol=1e-12)
                assert got["channels_last"] == (step == len(expected) - 1)
            # Parameter gradients stay per rank (DDP averages them): their sum is the union batch's.
            for key in ("weight_grad", "bias_grad"):
                torch.testing.assert_close(sum(r["steps"][step][key] for r in group), want[key], rtol=1e-10,
                                           atol=1e-10)
            assert not torch.allclose(group[0]["steps"][step]["weight_grad"], want["weight_grad"])
    for rank, r in enumerate(results):
        # Joining pooled the group's statistics: ranks 0, 1 held means 0, 1 and variances 1, 2 (ranks 2, 3: 2, 3).
        first = rank - rank % devices
        mean = first + 0.5
        torch.testing.assert_close(r["pooled"][0], torch.full((5,), mean, dtype=torch.float64))
        var = (1 + first + first**2 + 2 + first + (first + 1) ** 2) / 2 - mean**2
        torch.testing.assert_close(r["pooled"][1], torch.full((5,), var, dtype=torch.float64))
        assert r["same_group"] and f"sync_devices={devices}" in r["repr"]
        assert r["keys"] == list(nn.Sequential(nn.BatchNorm3d(5)).state_dict())  # the group is no part of the state
        # Evaluation is plain BN with the running statistics.
        bn = results[rank]["steps"][-1]
        x = inputs[0][(rank % devices) * per_rank:(rank % devices + 1) * per_rank]
        ref = _sync_bn_module()
        expected = F.batch_norm(x, bn["running_mean"], bn["running_var"], ref.weight, ref.bias, False, 0.0, ref.eps)
        torch.testing.assert_close(r["eval_out"], expected.detach())


def _sync_bn_ddp_worker(rank, world, port, clips, labels, out_dir):
    _init(rank, world, port)
    model = _ddp_model()
    set_bn_splits(model, 1, sync_devices=world)
    net = DistributedDataParallel(model, broadcast_buffers=False)
    n = clips.shape[0] // world
    F.cross_entropy(net(clips[rank * n:(rank + 1) * n]), labels[rank * n:(rank + 1) * n]).backward()
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, os.path.join(out_dir, "grads.pt"))
        torch.save(model.state_dict(), os.path.join(out_dir, "state.pt"))
    _finish()


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("x3d_xs", num_classes=5, dropout=0.0)
    for m in model.modules():  # non-zero final BN gammas so that every layer gets a gradient
        if isinstance(m, nn.BatchNorm3d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return model.double()


def test_sync_bn_ddp_training_step_equals_single_process_on_the_union(tmp_path):
    # 2 clips per process, the case synchronised BN exists for: DDP gradients equal plain BN on all 4 clips.
    torch.manual_seed(1)
    clips, labels = torch.randn(4, 3, 4, 32, 32, dtype=torch.float64), torch.randint(0, 5, (4,))
    _run_ranks(_sync_bn_ddp_worker, 2, clips, labels, str(tmp_path))
    grads, state = torch.load(tmp_path / "grads.pt"), torch.load(tmp_path / "state.pt")
    model = _ddp_model()
    F.cross_entropy(model(clips), labels).backward()
    assert state.keys() == model.state_dict().keys()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-7, atol=1e-10, msg=name)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-7, atol=1e-10, msg=name)


def test_sync_bn_without_process_group_is_plain_bn(caplog):
    bn = _sync_bn_module()
    ref = _sync_bn_module()
    with caplog.at_level(logging.WARNING):
        set_bn_splits(nn.Sequential(bn), 1, sync_devices=4)
    assert "synchronised BN over 4 devices needs torch.distributed" in caplog.text and bn.process_group is None
    inputs, weights = _sync_bn_data()
    for got, want in zip(_sync_bn_steps(bn, inputs, weights), _sync_bn_steps(ref, inputs, weights)):
        for key in ("out", "x_grad", "running_mean", "running_var"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="single split per device"):
        bn.set_splits(2, group=object())


def _ddp_warnings_worker(rank: int, world: int, port: int, out: str) -> None:
    _init(rank, world, port)
    model = to_channels_last(build_model("x3d_xs", num_classes=4, dropout=0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = DistributedDataParallel(model, forward_sync_buffers=False)
        clips = torch.randn(2, 3, 4, 32, 32).contiguous(memory_format=torch.channels_last_3d)
        for _ in range(2):
            net(clips).sum().backward()
    if rank == 0:
        Path(out).write_text("\n".join(str(w.message) for w in caught))
    _finish()


def test_channels_last_model_trains_under_ddp_without_warnings(tmp_path):
    # DDP's gradient buckets follow the parameters' strides; the gradients of 1x1x1 and depthwise kernels come back
    # with standard strides, which to_channels_last keeps for them
    model = to_channels_last(build_model("x3d_xs", num_classes=4))
    assert model.stem.conv_s.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(p.stride() == p.contiguous().stride() for p in model.parameters() if p.is_contiguous())
    _run_ranks(_ddp_warnings_worker, 2, str(tmp_path / "warnings.txt"))
    assert (tmp_path / "warnings.txt").read_text() == ""
