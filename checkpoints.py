"""X3D weights from every released format, converted to this project's state-dict keys.

Recognised files (all read with torch.load(weights_only=True) through utils.load_checkpoint_file, so a file whose
unpickling would run code is refused):

| format        | container key      | marker key                        | notes                                      |
|---------------|--------------------|-----------------------------------|--------------------------------------------|
| project       | `model`            | `stem.conv_s.weight`              | this project's own (with `model_cfg`)      |
| pyslowfast    | `model_state`      | `s1.pathway0_stem.conv_xy.weight` | PySlowFast model zoo `.pyth`               |
| pytorchvideo  | `model_state`      | `blocks.0.conv.conv_t.weight`     | PyTorchVideo hub `.pyth`; it has no stage-1|
|               |                    |                                   | shortcut BN, so an identity one is added   |
| x3d_multigrid | `model_state_dict` | `conv1_s.weight`                  | the original X3D-Multigrid `.pt`; sub-batch|
|               |                    |                                   | BN buffers (length k*C) are aggregated     |

A `module.` (DDP), `_orig_mod.` (torch.compile) or `model.` (PySlowFast's PyTorchVideo wrapper) prefix is removed.

Class names travel as `classes` (a list, index i = class i), the key this project's run checkpoints use. FAIR's files
carry none; their 400 outputs are Kinetics-400 in FAIR's order, which is kinetics_400_classes.txt.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch
from torch import nn

from utils import CheckpointError, UserError, load_checkpoint_file
from x3d import MODELS, build_model_from_cfg, stage_plan

FORMAT_NAMES = {
    "project": "this project's checkpoint",
    "pyslowfast": "PySlowFast checkpoint",
    "pytorchvideo": "PyTorchVideo hub checkpoint",
    "x3d_multigrid": "original X3D-Multigrid checkpoint",
}
_MARKER_KEYS = {  # one key that only that format has
    "stem.conv_s.weight": "project",
    "s1.pathway0_stem.conv_xy.weight": "pyslowfast",
    "blocks.0.conv.conv_t.weight": "pytorchvideo",
    "conv1_s.weight": "x3d_multigrid",
}
_CONTAINER_KEYS = ("model", "model_state", "model_state_dict", "state_dict")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_BN_EPS = 1e-5  # every X3D implementation uses BatchNorm's default eps
# Kinetics-400's names, line i = class i of FAIR's released weights (PySlowFast and PyTorchVideo: the official CSV's
# labels sorted alphabetically, which is also how kinetics_multigrid.py numbers the official CSV's classes).
KINETICS_400_CLASSES_FILE = Path(__file__).resolve().with_name("kinetics_400_classes.txt")

# Renaming rules per format: (pattern, replacement). A group named `s` is a stage number, shifted to 0-based by the
# format's offset; `j` is the block index within the stage. Keys that match no rule stop the conversion.
_BLOCK = "stages.{s}.{j}."
_RULES = {
    "pyslowfast": (2, [
        (r"s1\.pathway0_stem\.conv_xy\.", "stem.conv_s."),
        (r"s1\.pathway0_stem\.conv\.", "stem.conv_t."),
        (r"s1\.pathway0_stem\.bn\.", "stem.bn."),
        (r"s(?P<s>[2-5])\.pathway0_res(?P<j>\d+)\.branch1\.", _BLOCK + "shortcut_conv."),
        (r"s(?P<s>[2-5])\.pathway0_res(?P<j>\d+)\.branch1_bn\.", _BLOCK + "shortcut_bn."),
        (r"s(?P<s>[2-5])\.pathway0_res(?P<j>\d+)\.branch2\.(?P<x>[abc])\.", _BLOCK + "conv_{x}."),
        (r"s(?P<s>[2-5])\.pathway0_res(?P<j>\d+)\.branch2\.(?P<x>[abc])_bn\.", _BLOCK + "bn_{x}."),
        (r"s(?P<s>[2-5])\.pathway0_res(?P<j>\d+)\.branch2\.se\.(?P<x>fc[12])\.", _BLOCK + "se.{x}."),
        (r"head\.conv_5\.", "head.pre_conv."),
        (r"head\.conv_5_bn\.", "head.pre_bn."),
        (r"head\.lin_5\.", "head.post_conv."),
        (r"head\.projection\.", "head.classifier."),
    ]),
    "pytorchvideo": (1, [
        (r"blocks\.0\.conv\.conv_t\.", "stem.conv_s."),  # conv_t is the spatial 1x3x3 conv, despite its name
        (r"blocks\.0\.conv\.conv_xy\.", "stem.conv_t."),  # and conv_xy the temporal 5x1x1 one
        (r"blocks\.0\.norm\.", "stem.bn."),
        (r"blocks\.(?P<s>[1-4])\.res_blocks\.(?P<j>\d+)\.branch1_conv\.", _BLOCK + "shortcut_conv."),
        (r"blocks\.(?P<s>[1-4])\.res_blocks\.(?P<j>\d+)\.branch1_norm\.", _BLOCK + "shortcut_bn."),
        (r"blocks\.(?P<s>[1-4])\.res_blocks\.(?P<j>\d+)\.branch2\.conv_(?P<x>[abc])\.", _BLOCK + "conv_{x}."),
        (r"blocks\.(?P<s>[1-4])\.res_blocks\.(?P<j>\d+)\.branch2\.norm_(?P<x>[ac])\.", _BLOCK + "bn_{x}."),
        (r"blocks\.(?P<s>[1-4])\.res_blocks\.(?P<j>\d+)\.branch2\.norm_b\.0\.", _BLOCK + "bn_b."),
        (r"blocks\.(?P<s>[1-4])\.res_blocks\.(?P<j>\d+)\.branch2\.norm_b\.1\.block\.0\.", _BLOCK + "se.fc1."),
        (r"blocks\.(?P<s>[1-4])\.res_blocks\.(?P<j>\d+)\.branch2\.norm_b\.1\.block\.2\.", _BLOCK + "se.fc2."),
        (r"blocks\.5\.pool\.pre_conv\.", "head.pre_conv."),
        (r"blocks\.5\.pool\.pre_norm\.", "head.pre_bn."),
        (r"blocks\.5\.pool\.post_conv\.", "head.post_conv."),
        (r"blocks\.5\.proj\.", "head.classifier."),
    ]),
    "x3d_multigrid": (1, [
        (r"conv1_s\.", "stem.conv_s."),
        (r"conv1_t\.", "stem.conv_t."),
        (r"bn1\.", "stem.bn."),
        (r"layer(?P<s>[1-4])\.(?P<j>\d+)\.conv1\.", _BLOCK + "conv_a."),
        (r"layer(?P<s>[1-4])\.(?P<j>\d+)\.bn1\.", _BLOCK + "bn_a."),
        (r"layer(?P<s>[1-4])\.(?P<j>\d+)\.conv2\.", _BLOCK + "conv_b."),
        (r"layer(?P<s>[1-4])\.(?P<j>\d+)\.bn2\.", _BLOCK + "bn_b."),
        (r"layer(?P<s>[1-4])\.(?P<j>\d+)\.conv3\.", _BLOCK + "conv_c."),
        (r"layer(?P<s>[1-4])\.(?P<j>\d+)\.bn3\.", _BLOCK + "bn_c."),
        (r"layer(?P<s>[1-4])\.(?P<j>\d+)\.(?P<x>fc[12])\.", _BLOCK + "se.{x}."),
        (r"layer(?P<s>[1-4])\.(?P<j>\d+)\.downsample\.0\.", _BLOCK + "shortcut_conv."),
        (r"layer(?P<s>[1-4])\.(?P<j>\d+)\.downsample\.1\.", _BLOCK + "shortcut_bn."),
        (r"conv5\.", "head.pre_conv."),
        (r"bn5\.", "head.pre_bn."),
        (r"fc1\.", "head.post_conv."),  # a 1x1x1 conv 432 -> 2048
        (r"fc2\.", "head.classifier."),
    ]),
}


# ----------------------------------------------------------------------------------------------------------------------
# Reading a file and finding its format
# ----------------------------------------------------------------------------------------------------------------------
def _find_state_dict(ckpt: dict, path: os.PathLike | str) -> dict[str, torch.Tensor]:
    for key in _CONTAINER_KEYS:
        if isinstance(ckpt.get(key), dict):
            state = ckpt[key]
            break
    else:
        state = ckpt  # a bare state dict
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: no weights found: expected a dict of tensors, possibly under one of "
                              f"{list(_CONTAINER_KEYS)}; top-level keys are {sorted(ckpt)[:10]}")
    stripped = True
    while stripped:  # wrappers nest, e.g. "module._orig_mod." for a compiled model inside DDP
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _detect_format(state: dict[str, torch.Tensor], path: os.PathLike | str) -> str:
    for marker, fmt in _MARKER_KEYS.items():
        if marker in state:
            return fmt
    sample = ", ".join(sorted(state)[:6])
    raise CheckpointError(
        f"{path}: not an X3D checkpoint in a known format (this project's, PySlowFast .pyth, PyTorchVideo hub .pyth "
        f"or original X3D-Multigrid .pt): none of the keys {list(_MARKER_KEYS)} is present; keys start with {sample}")


def _read(path: os.PathLike | str) -> tuple[dict, dict[str, torch.Tensor], str]:
    ckpt = load_checkpoint_file(path)
    state = _find_state_dict(ckpt, path)
    fmt = _detect_format(state, path)
    if fmt != "project":
        state = _rename(_fold_split_bn(state, path), fmt, path)
        if fmt == "pytorchvideo":
            _insert_identity_bn(state, "stages.0.0.shortcut_bn", "stages.0.0.shortcut_conv.weight")
    return ckpt, state, fmt


def load_weights(path: os.PathLike | str) -> tuple[dict[str, torch.Tensor], str]:
    """Read any supported checkpoint: (state dict in this project's keys, name of the format found)."""
    _, state, fmt = _read(path)
    return state, fmt


def load_named_weights(path: os.PathLike | str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state dict in this project's keys, the variant the file names: its model_cfg's, else its file name's, if any).

    XS, S and M share every weight shape, so only the name tells them apart."""
    ckpt, state, fmt = _read(path)
    cfg = ckpt.get("model_cfg") if fmt == "project" and isinstance(ckpt.get("model_cfg"), dict) else {}
    named = cfg.get("name") or _variant_in_filename(path)
    return state, named if named in MODELS else None


# ----------------------------------------------------------------------------------------------------------------------
# Key conversion
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _fold_split_bn(state: dict[str, torch.Tensor], path: os.PathLike | str) -> dict[str, torch.Tensor]:
    """Sub-batch BN layers (X.weight, X.bias, X.bn.*, X.split_bn.*) -> plain BN keys with aggregated statistics.

    The per-group statistics (length k*C, group-major) are the ones training updated; X.bn.running_* is only as fresh
    as the last aggregation before the file was written, so it is ignored.
    """
    layers = [k[: -len("split_bn.running_mean")] for k in state if k.endswith("split_bn.running_mean")]
    # e.g. "layer1.0.bn1." (with the dot): its "bn." and "split_bn." sub-keys are replaced by plain BN statistics
    out = {k: v for k, v in state.items() if not any(k.startswith((p + "bn.", p + "split_bn.")) for p in layers)}
    for layer in layers:
        key = layer + "split_bn.running_mean"
        if layer + "weight" not in state:
            raise CheckpointError(f"{path}: sub-batch BN {layer[:-1]!r} has statistics but no weight")
        channels = state[layer + "weight"].numel()
        split_mean, split_var = state[key], state[layer + "split_bn.running_var"]
        if split_mean.numel() % channels:
            raise CheckpointError(f"{path}: {key} has {split_mean.numel()} entries, not a multiple of the layer's "
                                  f"{channels} channels")
        means = split_mean.view(-1, channels).double()  # (k, C)
        mean = means.mean(0)
        var = split_var.view(-1, channels).double().mean(0) + (means - mean).square().mean(0)
        out[layer + "running_mean"] = mean.to(split_mean.dtype)
        out[layer + "running_var"] = var.to(split_var.dtype)
        out[layer + "num_batches_tracked"] = state.get(layer + "split_bn.num_batches_tracked", torch.tensor(0))
    return out


def _rename(state: dict[str, torch.Tensor], fmt: str, path: os.PathLike | str) -> dict[str, torch.Tensor]:
    offset, rules = _RULES[fmt]
    compiled = [(re.compile(pattern), template) for pattern, template in rules]
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, template in compiled:
            m = pattern.match(key)
            if m:
                groups = m.groupdict()
                if "s" in groups:
                    groups["s"] = int(groups["s"]) - offset
                out[template.format(**groups) + key[m.end():]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: {FORMAT_NAMES[fmt]} with {len(unknown)} keys this X3D does not have (a "
                              f"different architecture or option, e.g. a BN after lin_5?): {unknown[:8]}")
    return out


def _insert_identity_bn(state: dict[str, torch.Tensor], layer: str, conv_key: str) -> None:
    """A BN that is exactly the identity in eval: weight 1, bias 0, mean 0, var 1 - eps."""
    if conv_key not in state or f"{layer}.weight" in state:
        return
    conv = state[conv_key]
    channels = conv.shape[0]
    state[f"{layer}.weight"] = torch.ones(channels, dtype=conv.dtype)
    state[f"{layer}.bias"] = torch.zeros(channels, dtype=conv.dtype)
    state[f"{layer}.running_mean"] = torch.zeros(channels, dtype=conv.dtype)
    state[f"{layer}.running_var"] = torch.full((channels,), 1 - _BN_EPS, dtype=conv.dtype)
    state[f"{layer}.num_batches_tracked"] = torch.tensor(0)


# ----------------------------------------------------------------------------------------------------------------------
# Which variant the weights are
# ----------------------------------------------------------------------------------------------------------------------
def architecture(state: dict[str, torch.Tensor],
                 path: os.PathLike | str = "") -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(stem width, stage output widths, blocks per stage) of a state dict in this project's keys (from `path`)."""
    blocks = [0, 0, 0, 0]
    for key in state:
        m = re.match(r"stages\.([0-3])\.(\d+)\.conv_a\.weight$", key)
        if m:
            blocks[int(m[1])] = max(blocks[int(m[1])], int(m[2]) + 1)
    try:
        widths = tuple(state[f"stages.{s}.0.conv_c.weight"].shape[0] for s in range(4))
        return state["stem.conv_s.weight"].shape[0], widths, tuple(blocks)
    except KeyError as e:
        raise CheckpointError(f"{path}: incomplete X3D weights: {e.args[0]} is missing") from e


def _variant_architecture(name: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    cfg = MODELS[name].default_cfg
    stem, stages = stage_plan(cfg.width_factor, cfg.depth_factor)
    return stem, tuple(s[0] for s in stages), tuple(s[2] for s in stages)


def _variant_in_filename(path: os.PathLike | str) -> str | None:
    m = re.search(r"x3d[_-]?(xs|xl|s|m|l)(?![a-z0-9])", Path(path).name.lower())
    return f"x3d_{m[1]}" if m else None


def resolve_variant(state: dict[str, torch.Tensor], requested: str | None = None, stored: str | None = None,
                    path: os.PathLike | str = "") -> tuple[str, str]:
    """The registered variant these weights fit, and why it was chosen.

    XS, S and M share every weight shape, so among them: `requested` (--model), else the name stored in the
    checkpoint, else a variant named in the file name (X3D_XS.pyth), else x3d_m.
    """
    found = architecture(state, path)
    fits = [name for name in MODELS if _variant_architecture(name) == found]
    if not fits:
        stem, widths, blocks = found
        raise CheckpointError(
            f"{path}: no registered X3D variant has stem width {stem}, stage widths {list(widths)} and "
            f"{list(blocks)} blocks per stage (XL here is 32/72/136/280 wide, PySlowFast's newer rounding gives "
            f"35/70/139/278)")
    if requested is not None:
        if requested not in fits:
            raise CheckpointError(f"{path}: --model {requested} does not fit these weights; they fit {fits}")
        return requested, "as requested"
    if stored in fits:
        return stored, "named in the checkpoint"
    named = _variant_in_filename(path)
    if named in fits:
        return named, "from the file name"
    if len(fits) == 1:
        return fits[0], "from the weights' shapes"
    default = "x3d_m" if "x3d_m" in fits else fits[0]
    return default, f"the default among {', '.join(fits)}, which share weights shapes; pass --model to choose"


# ----------------------------------------------------------------------------------------------------------------------
# Loading into a model
# ----------------------------------------------------------------------------------------------------------------------
def load_finetune(model: nn.Module, state_dict: dict[str, torch.Tensor], path: os.PathLike | str = "") -> dict:
    """Load every tensor whose name and shape match `model` (e.g. all but a classifier of another size).

    Returns {"loaded", "missing", "unexpected", "mismatched"}: loaded keys; model keys absent from the checkpoint;
    checkpoint keys the model lacks; and (key, checkpoint shape, model shape) for keys whose shapes differ
    (`finetune_summary` prints it). Weights of another X3D variant (other widths or depths; a different classifier is
    fine) are refused with a CheckpointError naming the variants they fit: loading whatever overlaps would train a
    half-initialised network.
    """
    own = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                  if k in own and own[k].shape != v.shape]
    try:
        theirs = architecture(state_dict)
    except CheckpointError:
        theirs = None  # too incomplete to tell; shape mismatches below still count
    ours = architecture(own)
    backbone = [m for m in mismatched if not m[0].startswith("head.classifier.")]
    if (theirs is not None and theirs != ours) or backbone:
        fits = [name for name in MODELS if theirs is not None and _variant_architecture(name) == theirs]
        described = (f"stem {theirs[0]}, stage widths {list(theirs[1])}, blocks {list(theirs[2])}" if theirs else
                     f"{len(backbone)} tensors of other shapes, e.g. {backbone[0][0]} {list(backbone[0][1])}")
        name = getattr(getattr(model, "cfg", None), "name", "the model")
        raise CheckpointError(
            f"{path or 'the --finetune weights'}: another X3D than {name} ({described}; {name} has stem {ours[0]}, "
            f"stage widths {list(ours[1])}, blocks {list(ours[2])}). "
            + (f"They fit {', '.join(fits)}: pass --model {fits[0]}." if fits else "No registered variant fits them."))
    loaded = [k for k, v in state_dict.items() if k in own and own[k].shape == v.shape]
    unexpected = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict]
    model.load_state_dict({k: state_dict[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def finetune_summary(report: dict, limit: int = 4) -> str:
    """What fine-tuning loaded: the four counts, then the first `limit` names of each kind not loaded."""
    lines = [f"fine-tuning: loaded {len(report['loaded'])} tensors, missing {len(report['missing'])} (kept their "
             f"initialisation), unexpected {len(report['unexpected'])} (ignored), shape mismatch "
             f"{len(report['mismatched'])} (kept their initialisation)"]

    def names(items: list[str]) -> str:
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    if report["mismatched"]:
        lines.append("  shape mismatch: " + names([f"{k} {list(theirs)} in the checkpoint, {list(ours)} in the model"
                                                   for k, theirs, ours in report["mismatched"]]))
    for kind in ("missing", "unexpected"):
        if report[kind]:
            lines.append(f"  {kind}: {names(report[kind])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Class names
# ----------------------------------------------------------------------------------------------------------------------
def read_class_names(path: os.PathLike | str, num_classes: int | None = None) -> list[str]:
    """Class names from a text file, one per line in class-index order (blank lines skipped); checks the count."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such class-name file (expected one name per line, line i = class i)")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if num_classes is not None and len(names) != num_classes:
        raise UserError(f"{path}: {len(names)} class names, but the model has {num_classes} classes")
    return names


def kinetics_400_classes() -> list[str]:
    """The 400 Kinetics class names in the class order of FAIR's released X3D weights."""
    return read_class_names(KINETICS_400_CLASSES_FILE, 400)


def default_class_names(num_classes: int, stored: object = None) -> tuple[list[str] | None, str]:
    """(names, where they come from) for a classifier without --labels: `stored` (a checkpoint's `classes`) when it
    names every class, else Kinetics-400's for 400 classes, else (None, why not).

    Stored names that are only the indices ("0", "1", ...: a list file trained without labels.txt) count as none.
    """
    if (isinstance(stored, list) and len(stored) == num_classes and all(isinstance(c, str) for c in stored)
            and stored != [str(i) for i in range(num_classes)]):
        return stored, "stored in the checkpoint"
    if num_classes == 400:
        return kinetics_400_classes(), f"Kinetics-400 in FAIR's order ({KINETICS_400_CLASSES_FILE.name})"
    return None, f"none known for {num_classes} classes"


def _converted_class_names(given: list[str] | None, num_classes: int, in_weights: int, stored: object,
                           path: os.PathLike | str) -> tuple[list[str] | None, str]:
    if given is not None:
        if len(given) != num_classes:
            raise CheckpointError(f"--labels gives {len(given)} class names, but the model converted from {path} has "
                                  f"{num_classes} classes")
        return list(given), "as given"
    if num_classes != in_weights:  # a fresh classifier's outputs mean nothing yet
        return None, "none for a re-initialised classifier"
    return default_class_names(num_classes, stored)


CHECKPOINT_INPUT_KEYS = ("multi_label", "mean", "std", "rate_fps")  # kept from this project's files, for predict.py


def convert_checkpoint(path: os.PathLike | str, model: str | None = None, num_classes: int | None = None,
                       classes: list[str] | None = None) -> tuple[dict, list[str]]:
    """Any supported file -> this project's {"model", "model_cfg", "converted_from"[, "classes", "classes_from"]}
    dict (and, from this project's own files, CHECKPOINT_INPUT_KEYS where present), and what was done.

    `classes` names the converted model's classes; by default they are the checkpoint's own names, or Kinetics-400's
    for a 400-class classifier (FAIR's files carry no names), and none for a re-initialised classifier.
    `classes_from` says which.
    """
    ckpt, state, fmt = _read(path)
    stored_cfg = ckpt.get("model_cfg") if fmt == "project" and isinstance(ckpt.get("model_cfg"), dict) else None
    name, why = resolve_variant(state, model, stored_cfg.get("name") if stored_cfg else None, path)
    if "head.classifier.weight" not in state:
        raise CheckpointError(f"{path}: the classifier weights are missing")
    in_weights = state["head.classifier.weight"].shape[0]
    cfg = dataclasses.asdict(MODELS[name].default_cfg)
    if stored_cfg and stored_cfg.get("name") == name:
        cfg.update(stored_cfg)
    cfg["num_classes"] = num_classes or in_weights
    try:
        net = build_model_from_cfg(cfg)
    except ValueError as e:  # a model_cfg written by another version of this project
        raise CheckpointError(f"{path}: {e}") from e
    notes = [f"{path}: {FORMAT_NAMES[fmt]}", f"variant {name} ({why}), {in_weights} classes in the weights"]
    if cfg["num_classes"] == in_weights:
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: the weights do not fit {name}: {e}") from e
    else:
        report = load_finetune(net, state, path)
        notes.append(f"classifier re-initialised for {cfg['num_classes']} classes; {finetune_summary(report)}")
    names, source = _converted_class_names(classes, cfg["num_classes"], in_weights, ckpt.get("classes"), path)
    notes.append(f"class names: {source}")
    # A file this tool wrote keeps the source it was converted from: its model_cfg then holds the variant's default
    # input, not what the source was trained on, and engine.resolve_input must know that.
    earlier = ckpt.get("converted_from") if fmt == "project" else None
    out = {"model": net.state_dict(), "model_cfg": dataclasses.asdict(net.cfg),
           "converted_from": earlier if isinstance(earlier, dict) else {"file": Path(path).name, "format": fmt}}
    if names is not None:
        out.update(classes=names, classes_from=source)
    if fmt == "project":  # how the run read and scored its clips (the Charades recipes record it)
        out.update({key: ckpt[key] for key in CHECKPOINT_INPUT_KEYS if key in ckpt})
    return out, notes
