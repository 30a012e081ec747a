"""Released checkpoint formats -> this project's keys: PyTorchVideo (against its own model), PySlowFast, the original
X3D-Multigrid files (sub-batch BN statistics), this project's own files; variant inference; fine-tuning report;
refusal of code-executing pickles; the command-line tool."""

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from checkpoints import convert_checkpoint, finetune_summary, load_finetune, load_weights, resolve_variant
from utils import CheckpointError, load_checkpoint_file
from x3d import build_model, build_model_from_cfg

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def randomize(model: nn.Module) -> nn.Module:
    """Random BN affine and statistics (zero-init gammas included) and a larger classifier, so every path counts."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0, 0.05)
            m.bias.normal_(0, 0.1)
    return model.eval()


def our_model(name: str = "x3d_xs", num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return randomize(build_model(name, num_classes))


def outputs(model: nn.Module, clips: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(clips)


# Our keys -> another format's keys, written independently of checkpoints.py (the inverse direction).
_BLOCK = r"stages\.(?P<s>\d)\.(?P<j>\d+)\."
TO_PYSLOWFAST = [
    (r"stem\.conv_s\.", "s1.pathway0_stem.conv_xy."), (r"stem\.conv_t\.", "s1.pathway0_stem.conv."),
    (r"stem\.bn\.", "s1.pathway0_stem.bn."),
    (_BLOCK + r"shortcut_conv\.", "s{s2}.pathway0_res{j}.branch1."),
    (_BLOCK + r"shortcut_bn\.", "s{s2}.pathway0_res{j}.branch1_bn."),
    (_BLOCK + r"conv_(?P<x>[abc])\.", "s{s2}.pathway0_res{j}.branch2.{x}."),
    (_BLOCK + r"bn_(?P<x>[abc])\.", "s{s2}.pathway0_res{j}.branch2.{x}_bn."),
    (_BLOCK + r"se\.(?P<x>fc[12])\.", "s{s2}.pathway0_res{j}.branch2.se.{x}."),
    (r"head\.pre_conv\.", "head.conv_5."), (r"head\.pre_bn\.", "head.conv_5_bn."),
    (r"head\.post_conv\.", "head.lin_5."), (r"head\.classifier\.", "head.projection."),
]
TO_ORIGINAL = [
    (r"stem\.conv_s\.", "conv1_s."), (r"stem\.conv_t\.", "conv1_t."), (r"stem\.bn\.", "bn1."),
    (_BLOCK + r"conv_a\.", "layer{s1}.{j}.conv1."), (_BLOCK + r"bn_a\.", "layer{s1}.{j}.bn1."),
    (_BLOCK + r"conv_b\.", "layer{s1}.{j}.conv2."), (_BLOCK + r"bn_b\.", "layer{s1}.{j}.bn2."),
    (_BLOCK + r"conv_c\.", "layer{s1}.{j}.conv3."), (_BLOCK + r"bn_c\.", "layer{s1}.{j}.bn3."),
    (_BLOCK + r"se\.(?P<x>fc[12])\.", "layer{s1}.{j}.{x}."),
    (_BLOCK + r"shortcut_conv\.", "layer{s1}.{j}.downsample.0."),
    (_BLOCK + r"shortcut_bn\.", "layer{s1}.{j}.downsample.1."),
    (r"head\.pre_conv\.", "conv5."), (r"head\.pre_bn\.", "bn5."), (r"head\.post_conv\.", "fc1."),
    (r"head\.classifier\.", "fc2."),
]


def rename(key: str, rules) -> str:
    for pattern, template in rules:
        m = re.match(pattern, key)
        if m:
            g = m.groupdict()
            fields = {"x": g.get("x"), "j": g.get("j")}
            if g.get("s") is not None:
                fields.update(s1=int(g["s"]) + 1, s2=int(g["s"]) + 2)
            return template.format(**fields) + key[m.end():]
    raise AssertionError(f"no rule for {key}")


# ----------------------------------------------------------------------------------------------------------------------
# PyTorchVideo: against its own create_x3d
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "depth"), [("x3d_xs", 2.2), ("x3d_l", 5.0)])
def test_pytorchvideo_checkpoint_matches_reference_model(tmp_path, name, depth):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorchvideo.models.x3d import create_x3d
    torch.manual_seed(0)
    # Its head pools with a fixed kernel sized for the input it is built for; at that input the pool output is 1x1x1
    # and equals our global pooling (at larger inputs it averages after the classifier instead).
    reference = randomize(create_x3d(input_clip_length=4, input_crop_size=64, depth_factor=depth, model_num_class=10,
                                     head_activation=None))
    path = tmp_path / f"X3D_{name[4:].upper()}.pyth"
    torch.save({"model_state": reference.state_dict()}, path)

    state, fmt = load_weights(path)
    assert fmt == "pytorchvideo"
    assert resolve_variant(state, path=path)[0] == name
    bn = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith("stages.0.0.shortcut_bn.")}
    assert (bn["weight"] == 1).all() and (bn["bias"] == 0).all() and (bn["running_mean"] == 0).all()
    assert torch.equal(bn["running_var"], torch.full((24,), 1 - 1e-5))  # (x - 0) / sqrt(var + eps): the identity
    model = build_model(name, num_classes=10)
    model.load_state_dict(state)  # strict
    clips = torch.randn(2, 3, 4, 64, 64)
    expected = outputs(reference, clips)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(outputs(model, clips), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# PySlowFast and the original repository: key mappings built from our model
# ----------------------------------------------------------------------------------------------------------------------
def test_pyslowfast_checkpoint(tmp_path):
    model = our_model()
    state = {rename(k, TO_PYSLOWFAST): v for k, v in model.state_dict().items()}
    assert "s2.pathway0_res0.branch1_bn.running_var" in state and "head.lin_5.weight" in state
    path = tmp_path / "x3d_xs.pyth"
    torch.save({"model_state": state, "optimizer_state": {}, "epoch": 299, "cfg": "MODEL:\n  ARCH: x3d\n"}, path)
    converted, fmt = load_weights(path)
    assert fmt == "pyslowfast"
    assert converted.keys() == model.state_dict().keys()
    loaded = build_model("x3d_xs", num_classes=10)
    loaded.load_state_dict(converted)
    clips = torch.randn(2, 3, 4, 32, 32)
    torch.testing.assert_close(outputs(loaded, clips), outputs(model, clips), rtol=0, atol=0)


def original_repo_state(model: nn.Module, k: int) -> tuple[dict, dict]:
    """`model` in the original repository's keys with sub-batch BN buffers of k groups; also the expected stats."""
    torch.manual_seed(1)
    state, expected = {}, {}
    for key, value in model.state_dict().items():
        if not key.endswith(".running_mean"):
            if not key.endswith((".running_var", ".num_batches_tracked")):
                state[rename(key, TO_ORIGINAL)] = value
            continue
        layer = key[: -len("running_mean")]
        new = rename(layer + "weight", TO_ORIGINAL)[: -len("weight")]
        means = torch.randn(k, value.numel()) * 0.3  # per-group statistics, group-major like PySlowFast's split_bn
        variances = torch.rand(k, value.numel()) + 0.5
        mean = means.mean(0)
        expected[layer + "running_mean"] = mean
        expected[layer + "running_var"] = variances.mean(0) + (means - mean).square().mean(0)
        state[new + "split_bn.running_mean"] = means.flatten()
        state[new + "split_bn.running_var"] = variances.flatten()
        state[new + "split_bn.num_batches_tracked"] = torch.tensor(1000)
        state[new + "bn.running_mean"] = torch.zeros_like(mean)  # stale: never aggregated, must be ignored
        state[new + "bn.running_var"] = torch.ones_like(mean)
        state[new + "bn.num_batches_tracked"] = torch.tensor(0)
    return state, expected


@pytest.mark.parametrize("k", [1, 4])
def test_original_repo_checkpoint_aggregates_sub_batch_statistics(tmp_path, k):
    model = our_model(num_classes=157)
    state, expected = original_repo_state(model, k)
    assert len(state) == 820  # the original X3D-M/S state dict size (8 entries per sub-batch BN)
    assert state["layer1.0.downsample.1.split_bn.running_mean"].shape == (24 * k,)
    path = tmp_path / "x3d_charades_rgb_sgd_024000.pt"
    torch.save({"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "scheduler_state_dict": {"milestones": Counter({82464: 1}), "gamma": 0.1}, "long_ind": -1}, path)
    converted, fmt = load_weights(path)
    assert fmt == "x3d_multigrid"
    for key, value in expected.items():
        torch.testing.assert_close(converted[key], value)
    assert converted["stem.bn.num_batches_tracked"] == 1000
    model.load_state_dict(expected, strict=False)  # the reference: our model with the aggregated statistics
    loaded = build_model("x3d_m", num_classes=157)
    loaded.load_state_dict(converted)
    clips = torch.randn(2, 3, 4, 32, 32)
    torch.testing.assert_close(outputs(loaded, clips), outputs(model, clips), rtol=1e-5, atol=1e-5)


def test_original_repo_xl_checkpoint_converts_to_x3d_xl(tmp_path):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model("x3d_xl").state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        state[rename(key, TO_ORIGINAL)] = torch.zeros(shape)
        if re.search(r"(bn_[abc]|shortcut_bn|pre_bn|stem\.bn)\.weight$", key):
            layer = rename(key, TO_ORIGINAL)[: -len("weight")]
            state[layer + "split_bn.running_mean"] = torch.zeros(shape[0])
            state[layer + "split_bn.running_var"] = torch.ones(shape[0])
    path = tmp_path / "x3d_xl_kinetics.pt"
    torch.save({"model_state_dict": state}, path)
    converted, notes = convert_checkpoint(path)
    assert converted["model_cfg"]["name"] == "x3d_xl" and converted["model_cfg"]["width_factor"] == 2.9
    assert converted["model"]["stages.3.0.conv_c.weight"].shape[0] == 280


# ----------------------------------------------------------------------------------------------------------------------
# This project's own files, variants, fine-tuning
# ----------------------------------------------------------------------------------------------------------------------
def test_own_checkpoint_with_ddp_prefix_keeps_its_config(tmp_path):
    model = our_model("x3d_s", num_classes=7)
    path = tmp_path / "checkpoint.pt"
    cfg = {**dataclasses.asdict(model.cfg), "train_jitter": [182, 228]}  # as if it had been through JSON
    wrapped = {"module._orig_mod." + k: v for k, v in model.state_dict().items()}  # compiled model inside DDP
    torch.save({"model": wrapped, "model_cfg": cfg, "epoch": 3,
                "args": {"lr": 0.1}}, path)
    state, fmt = load_weights(path)
    assert fmt == "project" and state.keys() == model.state_dict().keys()
    converted, notes = convert_checkpoint(path)
    assert converted["model_cfg"]["name"] == "x3d_s" and converted["model_cfg"]["num_classes"] == 7
    rebuilt = build_model_from_cfg(converted["model_cfg"])
    rebuilt.load_state_dict(converted["model"])
    clips = torch.randn(2, 3, 4, 32, 32)
    torch.testing.assert_close(outputs(rebuilt, clips), outputs(model, clips), rtol=0, atol=0)


def test_variant_inference_from_weights_and_names():
    with torch.device("meta"):
        xs, large, xl = (build_model(n).state_dict() for n in ("x3d_xs", "x3d_l", "x3d_xl"))
    assert resolve_variant(large)[0] == "x3d_l"
    assert resolve_variant(xl, path="weights.pt")[0] == "x3d_xl"
    assert resolve_variant(xs) == ("x3d_m", "the default among x3d_xs, x3d_s, x3d_m, which share weights shapes; "
                                            "pass --model to choose")
    assert resolve_variant(xs, path="models/X3D_XS.pyth")[0] == "x3d_xs"
    assert resolve_variant(xs, path="x3d_multigrid_kinetics_fb_pretrained.pt")[0] == "x3d_m"
    assert resolve_variant(xs, requested="x3d_s", path="X3D_XS.pyth")[0] == "x3d_s"
    with pytest.raises(CheckpointError, match="--model x3d_l does not fit these weights"):
        resolve_variant(xs, requested="x3d_l")
    narrow = {**xs, "stem.conv_s.weight": torch.empty(35, 3, 1, 3, 3, device="meta")}
    with pytest.raises(CheckpointError, match="no registered X3D variant has stem width 35"):
        resolve_variant(narrow)


def test_load_finetune_reports_what_was_not_loaded():
    source = our_model("x3d_xs", num_classes=400).state_dict()
    source["head.extra.weight"] = torch.zeros(3)
    del source["stages.1.0.se.fc1.bias"]
    model = build_model("x3d_xs", num_classes=157)
    initial_classifier = model.head.classifier.weight.clone()
    report = load_finetune(model, source)
    assert report["mismatched"] == [("head.classifier.weight", (400, 2048), (157, 2048)),
                                    ("head.classifier.bias", (400,), (157,))]
    assert report["missing"] == ["stages.1.0.se.fc1.bias"]
    assert report["unexpected"] == ["head.extra.weight"]
    assert len(report["loaded"]) == len(model.state_dict()) - 3
    torch.testing.assert_close(model.state_dict()["stages.2.3.bn_b.running_var"], source["stages.2.3.bn_b.running_var"])
    torch.testing.assert_close(model.head.classifier.weight, initial_classifier)
    summary = finetune_summary(report).splitlines()
    assert summary[0] == (f"fine-tuning: loaded {len(model.state_dict()) - 3} tensors, missing 1 (kept their "
                          "initialisation), unexpected 1 (ignored), shape mismatch 2 (kept their initialisation)")
    assert "head.classifier.weight [400, 2048] in the checkpoint, [157, 2048] in the model" in summary[1]
    assert summary[2:] == ["  missing: stages.1.0.se.fc1.bias", "  unexpected: head.extra.weight"]
    # Long lists are cut to the first few names, with the count of the rest.
    many = {**report, "unexpected": [f"extra.{i}" for i in range(600)]}
    assert finetune_summary(many).splitlines()[-1] == "  unexpected: extra.0, extra.1, extra.2, extra.3 and 596 more"


def test_finetune_from_another_variant_is_refused():
    model = build_model("x3d_xs", num_classes=157)
    before = model.stages[0][0].conv_a.weight.clone()
    deeper = build_model("x3d_l", num_classes=400).state_dict()  # the same widths, deeper
    with pytest.raises(CheckpointError, match=r"x3d_l_kinetics\.pt: another X3D than x3d_xs \(stem 24, stage widths "
                                              r"\[24, 48, 96, 192\], blocks \[5, 10, 25, 15\]; x3d_xs has .*blocks "
                                              r"\[3, 5, 11, 7\]\)\. They fit x3d_l: pass --model x3d_l"):
        load_finetune(model, deeper, "x3d_l_kinetics.pt")
    torch.testing.assert_close(model.stages[0][0].conv_a.weight, before)  # nothing was loaded
    wider = build_model("x3d_xl", num_classes=157).state_dict()
    with pytest.raises(CheckpointError, match="another X3D than x3d_m.*They fit x3d_xl"):
        load_finetune(build_model("x3d_m", num_classes=157), wider)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------------
class Custom:
    """Unpickling this would import and call code."""


@pytest.mark.parametrize("payload", [argparse.Namespace(lr=0.1), Custom()])
def test_checkpoint_that_would_execute_code_is_refused(tmp_path, payload):
    path = tmp_path / "unsafe.pth"
    torch.save({"model_state": {"blocks.0.conv.conv_t.weight": torch.zeros(1)}, "cfg": payload}, path)
    with pytest.raises(CheckpointError, match="would execute code"):
        load_weights(path)


def test_unknown_format_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(2), "fc.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not an X3D checkpoint in a known format.*conv1.weight"):
        load_weights(path)
    torch.save({"model_state": {"blocks.0.conv.conv_t.weight": torch.zeros(1), "blocks.5.pool.post_norm.weight":
                                torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="keys this X3D does not have.*post_norm"):
        load_weights(path)


# ----------------------------------------------------------------------------------------------------------------------
# The command-line tool
# ----------------------------------------------------------------------------------------------------------------------
def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_convert_tool_writes_a_loadable_checkpoint(tmp_path):
    model = our_model("x3d_xs", num_classes=400)
    source = tmp_path / "x3d_s.pyth"
    torch.save({"model_state": {rename(k, TO_PYSLOWFAST): v for k, v in model.state_dict().items()}}, source)
    out = tmp_path / "models" / "x3d_xs_k7.pt"
    result = run_tool(str(source), str(out), "--num-classes", "7", "--model", "x3d_xs")
    assert result.returncode == 0, result.stderr
    assert "PySlowFast checkpoint" in result.stdout and "variant x3d_xs (as requested)" in result.stdout
    ckpt = load_checkpoint_file(out)
    assert ckpt["model_cfg"]["name"] == "x3d_xs" and ckpt["model_cfg"]["num_classes"] == 7
    assert ckpt["converted_from"] == {"file": "x3d_s.pyth", "format": "pyslowfast"}
    again, _ = convert_checkpoint(out)  # what --eval and predict.py do with it: still a converted PySlowFast file
    assert again["converted_from"] == {"file": "x3d_s.pyth", "format": "pyslowfast"}
    rebuilt = build_model_from_cfg(ckpt["model_cfg"])
    rebuilt.load_state_dict(ckpt["model"])  # strict
    torch.testing.assert_close(rebuilt.stages[2][4].conv_b.weight, model.stages[2][4].conv_b.weight)
    assert rebuilt.head.classifier.weight.shape == (7, 2048)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, unsafe)
    result = run_tool(str(unsafe), str(tmp_path / "never.pt"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "refused" in result.stderr and "execute code" in result.stderr
    assert not (tmp_path / "never.pt").exists()


def test_incomplete_weights_and_unknown_settings_are_named_with_their_file(tmp_path):
    state = our_model("x3d_xs").state_dict()
    cut = tmp_path / "cut.pt"
    torch.save({"model": {k: v for k, v in state.items() if k != "stages.3.0.conv_c.weight"}}, cut)
    with pytest.raises(CheckpointError, match=f"{cut}: incomplete X3D weights: stages.3.0.conv_c.weight is missing"):
        convert_checkpoint(cut)
    newer = tmp_path / "newer.pt"
    torch.save({"model": state, "model_cfg": {"name": "x3d_xs", "num_classes": 10, "stochastic_depth": 0.1}}, newer)
    with pytest.raises(CheckpointError, match=f"{newer}: model_cfg has unknown fields \\['stochastic_depth'\\]"):
        convert_checkpoint(newer)
