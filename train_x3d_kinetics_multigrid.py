"""Train X3D on Kinetics-400 with Multigrid, then evaluate with the 30-view protocol.

    python train_x3d_kinetics_multigrid.py -gpu 0,1,2,3 --data-root /data/kinetics400 --model x3d_m
    torchrun --nnodes 2 --nproc-per-node 8 ... train_x3d_kinetics_multigrid.py --data-root ... --model x3d_m
    python train_x3d_kinetics_multigrid.py --eval --resume logs/x3d_m_kinetics/checkpoint.pt --data-root ...
    python train_x3d_kinetics_multigrid.py --eval --resume logs/demo/checkpoint.pt --data-root data/demo/kinetics
        (the last one once `make demo` has run: the demo's model on the demo's validation videos)

Multigrid (Wu et al., CVPR 2020) trains on a schedule of clip shapes that keeps batch × frames × height × width about
constant: coarse shapes with big batches early in each long cycle, the full shape at its end, and a per-iteration
short cycle of spatial sizes. The schedule is a pure function of the flags (multigrid.py), so a resumed run recomputes
it, and the per-sample seeds it hands the dataset make a resumed run repeat the same clips.

The defaults are X3D's recipe: cosine LR over 300 epochs with 35 of warm-up, 0.1 per 128 clips (16 per device on 8
GPUs), weight decay 5e-5, dropout 0.5, the variant's own input; softmax cross-entropy; the test scores 10 clips × 3
crops per video and averages their softmax (video top-1 / top-5).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.nn.functional as F

import engine
import utils
from kinetics_multigrid import KineticsDataset, build_kinetics
from x3d import MODELS


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of the Kinetics recipe."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True,
                   help="Kinetics folder: official CSVs + videos, `path label` list files, or the original "
                        "repository's JSON + labels.txt + frame folders (detected automatically).")
    utils.add_input_args(p, sorted(MODELS))
    utils.add_optimisation_args(p, lr_rule="0.1 per 128 clips (X3D's rule)")
    utils.add_evaluation_args(p)
    return utils.add_common_args(p)


def check_args(args: argparse.Namespace) -> None:
    """Every flag combination that cannot work, named by its flags, before any data is indexed or model built."""
    utils.check_args(args, engine.resolve_input(args, None))


# ----------------------------------------------------------------------------------------------------------------------
# The task: data, evaluation
# ----------------------------------------------------------------------------------------------------------------------
def build_dataset(args: argparse.Namespace, spec: dict, split: str, views: int = 1, crops: int = 1) -> KineticsDataset:
    """The training set (split "train") or a `views` × `crops`-view evaluation set (split "val")."""
    common = dict(frames=spec["frames"], sampling_rate=spec["sampling_rate"], train_crop=spec["train_crop"],
                  train_jitter=spec["train_jitter"], test_crop=spec["test_crop"], backend=args.backend,
                  max_failure_fraction=args.max_failure_fraction)
    if split == "train":
        return build_kinetics(args.data_root, "train", mode="train", flip_prob=args.flip_prob, **common)
    return build_kinetics(args.data_root, "val", mode="test", num_temporal_views=views, num_spatial_crops=crops,
                          **common)


def evaluate(model, dataset: KineticsDataset, args, device, prefix: str) -> dict:
    """Video-level top-1/top-5 from the mean softmax over each video's views."""
    scores, labels, counts = engine.predict_videos(
        model, engine.eval_loader(dataset, args), dataset.num_videos, dataset.num_classes, device,
        amp=args.amp, progress=not args.no_progress)
    engine.check_failures(dataset, device)  # all ranks' failures together: the limit must not depend on their number
    scored = counts > 0  # a video none of whose views decoded is reported, not scored
    k5 = min(5, dataset.num_classes)
    acc = engine.topk_accuracy(scores[scored], labels[scored], ks=(1, k5))
    views = dataset.views_per_video
    stats = {f"{prefix}_top1": acc[1], f"{prefix}_top5": acc[k5], f"{prefix}_videos": int(scored.sum()),
             f"{prefix}_views": views, f"{prefix}_failed_videos": int((counts < views).sum())}
    if prefix == "test":  # per-class top-1 and their mean (mean class accuracy), for the final test only
        per_class = engine.per_class_top1(scores[scored], labels[scored], dataset.num_classes)
        stats[f"{prefix}_mean_class_top1"] = sum(per_class.values()) / max(len(per_class), 1)
        stats[f"{prefix}_class_top1"] = {dataset.classes[k]: v for k, v in per_class.items()}
    return stats


def result_line(stats: dict, prefix: str) -> str:
    """`test: video top-1 T1  top-5 T5  mean class top-1 MC  (VIDEOS videos × VIEWS views)`."""
    mean_class = stats.get(f"{prefix}_mean_class_top1")
    return (f"{prefix}: video top-1 {stats[f'{prefix}_top1']:.2f}  top-5 {stats[f'{prefix}_top5']:.2f}  "
            + (f"mean class top-1 {mean_class:.2f}  " if mean_class is not None else "")
            + f"({stats[f'{prefix}_videos']} videos × {stats[f'{prefix}_views']} views)")


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    check_args(args)
    run_dir = Path(args.output_dir or f"logs/{args.model}_kinetics")
    device, log = engine.start(args, run_dir)
    state, source = engine.starting_point(args, run_dir)
    spec = engine.resolve_input(args, state)
    task = engine.Task(loss=F.cross_entropy, evaluate=lambda m, d, p: evaluate(m, d, args, device, p), metric="top1",
                       result_line=result_line)
    test_views = args.test_views * args.test_crops

    if args.eval:  # ---- only the multi-view test of the given weights ----
        test_set = build_dataset(args, spec, "val", args.test_views, args.test_crops)
        engine.describe_data(test=test_set)
        return engine.test(engine.make_model(args, spec, test_set.num_classes, "clip", state, device), task, test_set)

    world = utils.get_world_size()
    schedule = engine.build_schedule(args, spec, world, default_lr=0.1 * args.batch_size * world / 128)
    stored = engine.finished_run(state, schedule, run_dir, task, test=test_views > 0)
    if stored is not None:
        return stored

    # ---- training, --val-views clips (one crop) per validation video between epochs ----
    train_set, val_set = build_dataset(args, spec, "train"), build_dataset(args, spec, "val", args.val_views)
    model = engine.make_model(args, spec, val_set.num_classes, "clip", state, device)
    stats = engine.fit(model, task, schedule, train_set, val_set, args, device, run_dir, log, (state, source),
                       extras={"classes": list(val_set.classes)})

    # ---- final multi-view test ----
    if test_views > 0:
        test_set = build_dataset(args, spec, "val", args.test_views, args.test_crops)
        stats.update(engine.test(model, task, test_set, log, schedule.num_epochs))
    return stats


if __name__ == "__main__":
    utils.launch(get_args_parser().parse_args(), main)
