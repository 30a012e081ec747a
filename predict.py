"""Top-5 classes of one video with the 30-view protocol (10 clips × 3 crops, mean softmax).

    python predict.py some_video.mp4 --checkpoint models/x3d_m_kinetics.pt
    python predict.py clip.mp4 --checkpoint logs/x3d_xs_demo/checkpoint.pt --labels data/demo/kinetics/labels.txt

The checkpoint may be this project's or any format tools/convert_checkpoint.py reads (FAIR's PySlowFast and
PyTorchVideo files, the original X3D-Multigrid files). Class names come from --labels (one per line), else from the
checkpoint (`classes`, which this project's runs and tools/convert_checkpoint.py store), else, for a 400-class model,
Kinetics-400's in the class order of FAIR's released weights (kinetics_400_classes.txt), else they are printed as
indices.

A checkpoint of the Charades recipes says how they read and scored clips (checkpoints.CHECKPOINT_INPUT_KEYS): its
classes are scored as Charades is, each one's sigmoid of its highest logit over the views (several can be likely at
once), from clips normalised with Charades' statistics and sampled in 24-fps frames. A localization model's per-frame
head is scored per clip (the same weights, pooled over time).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import DataLoader

import engine
from checkpoints import convert_checkpoint, read_class_names
from kinetics_multigrid import KineticsDataset, Video
from transforms import MEAN, STD
from utils import UserError, keep_freed_memory, run_cli
from video_dataset import TARGET_FPS
from x3d import MODELS, build_model_from_cfg


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="A video file (.mp4, .webm, .mkv, .avi) or a folder of JPEG frames.")
    p.add_argument("--checkpoint", required=True, help="Weights to use (any supported checkpoint format).")
    p.add_argument("--labels", default=None, help="Class names, one per line in class-index order.")
    p.add_argument("--model", default=None, choices=sorted(MODELS),
                   help="Variant for external weights that do not say (XS, S and M share weight shapes).")
    p.add_argument("--views", type=int, default=10, help="Temporal clips, uniformly spaced over the video.")
    p.add_argument("--crops", type=int, default=3, choices=[1, 3], help="Spatial crops per clip.")
    p.add_argument("--topk", type=int, default=5, help="How many classes to print.")
    p.add_argument("--backend", default="auto", choices=["auto", "pyav", "torchcodec"], help="Video decoder.")
    return p


def class_names(labels: str | None, converted: dict, num_classes: int) -> tuple[list[str], str]:
    """(names, where they come from): --labels, else the converted checkpoint's (its own `classes`, or Kinetics-400's
    for 400 classes: see checkpoints.convert_checkpoint), else "class i"."""
    if labels:
        return read_class_names(labels, num_classes), labels
    if converted.get("classes"):
        return converted["classes"], converted["classes_from"]
    return [f"class {i}" for i in range(num_classes)], "none known, so indices"


def main(args: argparse.Namespace) -> list[tuple[str, float]]:
    converted, notes = convert_checkpoint(args.checkpoint, model=args.model)
    model = build_model_from_cfg({**converted["model_cfg"], "head": "clip"})  # a per-frame head's weights fit too
    model.load_state_dict(converted["model"])
    cfg = model.cfg
    names, names_from = class_names(args.labels, converted, cfg.num_classes)
    multi_label = bool(converted.get("multi_label"))
    rate_fps = float(converted.get("rate_fps", TARGET_FPS))

    # One video in test mode: item i is (temporal view i // crops, spatial crop i % crops).
    dataset = KineticsDataset([Video(str(args.video), 0)], names, mode="test", frames=cfg.frames,
                              sampling_rate=cfg.sampling_rate, train_crop=cfg.train_crop,
                              train_jitter=tuple(cfg.train_jitter), test_crop=cfg.test_crop,
                              num_temporal_views=args.views, num_spatial_crops=args.crops, backend=args.backend,
                              max_failure_fraction=1.0, mean=tuple(converted.get("mean", MEAN)),
                              std=tuple(converted.get("std", STD)), rate_fps=rate_fps, frame_fps=rate_fps)
    loader = DataLoader(dataset, batch_size=args.crops)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).to(memory_format=torch.channels_last_3d)
    scores, _, counts = engine.predict_videos(model, loader, 1, cfg.num_classes, device, progress=False,
                                              **(dict(activation="none", reduce="max") if multi_label else {}))
    if counts[0] == 0:
        raise UserError(f"{args.video}: could not be decoded")
    if multi_label:
        scores = scores.sigmoid()
    top = scores[0].topk(min(args.topk, cfg.num_classes))
    result = [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]
    scoring = "sigmoid of the highest logit, multi-label" if multi_label else "mean softmax"
    print(f"{args.video}  ({cfg.name}, {int(counts[0])} views, {scoring}; {notes[0]}; class names: {names_from})")
    for name, p in result:
        print(f"  {p:7.2%}  {name}")
    return result


if __name__ == "__main__":
    keep_freed_memory()
    sys.exit(run_cli(main, get_args_parser().parse_args()))
