"""Fine-tune X3D on Charades: multi-label classification of its 157 actions, evaluated by mAP.

    python train_x3d_charades.py -gpu 0,1 --data-root /data/charades --finetune models/x3d_m_kinetics.pt
    python train_x3d_charades.py --eval --resume logs/x3d_m_charades/checkpoint.pt --data-root /data/charades

The defaults are the original X3D-Multigrid repository's recipe (35.01 mAP with X3D-M there): X3D-M at 224 px, 16
frames every 10th of the 24-fps frames (6.7 s), Charades' own mean and std; SGD with momentum 0.9, LR 0.04 per 32 clips
scaled linearly with the global batch, weight decay 1e-5, the LR divided by 10 when the validation loss has not
improved for 2 evaluations (PyTorch's ReduceLROnPlateau), an evaluation every epoch, at most 100 epochs. --lr-policy
cosine is the alternative, and multigrid is optional: --multigrid short with the plateau policy, any cycle with cosine.

A training clip's target is the union of the actions that overlap its time span (charades.py); the loss is binary
cross-entropy with logits. The evaluation scores --test-views clips (× 3 crops with --test-crops 3) per video, takes
each class's maximum logit over the views, and reports the mAP over the classes that have a positive
(Charades_v1_classify.m); a video none of whose views decoded still counts, ranked last.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.nn.functional as F

import charades
import engine
import utils
from charades import CharadesDataset, chance_map, mean_average_precision
from x3d import MODELS


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of the Charades classification recipe."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True,
                   help="Charades folder: Charades_v1_train.csv and Charades_v1_test.csv (or the original repository's "
                        "charades.json), the frames Charades_v1_rgb/<id>/<id>-000001.jpg or the videos, and "
                        "optionally Charades_v1_classes.txt for the class names.")
    utils.add_input_args(p, sorted(MODELS), rate_unit="Charades' 24-fps frames (default: 16 frames at rate 10)")
    utils.add_optimisation_args(p, lr_rule="0.04 per 32 clips (the original recipe)",
                                lr_policies=("plateau", "cosine", "steps"))
    utils.add_evaluation_args(p)
    utils.add_common_args(p)
    # The original validates every epoch on 10 clips per video, whose loss drives the plateau policy.
    p.set_defaults(epochs=100, warmup_epochs=0.0, weight_decay=1e-5, multigrid="none", eval_every=1, val_views=10,
                   precise_bn_batches=0, test_crops=1)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Every flag combination that cannot work, named by its flags, before any data is indexed or model built."""
    utils.check_args(args, engine.resolve_input(args, None, charades.ORIGINAL_INPUT))


# ----------------------------------------------------------------------------------------------------------------------
# The task: data, evaluation
# ----------------------------------------------------------------------------------------------------------------------
def build_dataset(args: argparse.Namespace, spec: dict, split: str, views: int = 1, crops: int = 1) -> CharadesDataset:
    """The training set (split "train") or a `views` × `crops`-view evaluation set (split "test")."""
    common = dict(task="class", **charades.dataset_options(spec, args.backend, args.max_failure_fraction))
    if split == "train":
        return CharadesDataset(args.data_root, split="train", mode="train", flip_prob=args.flip_prob, **common)
    return CharadesDataset(args.data_root, split="test", mode="test", num_temporal_views=views,
                           num_spatial_crops=crops, **common)


def evaluate(model, dataset: CharadesDataset, args, device, prefix: str) -> dict:
    """mAP of each video's maximum logits over its views, and their BCE loss (the plateau policy's signal)."""
    logits, targets, counts = engine.predict_videos(
        model, engine.eval_loader(dataset, args), dataset.num_videos, dataset.num_classes, device,
        activation="none", reduce="max", amp=args.amp, progress=not args.no_progress)
    engine.check_failures(dataset, device)  # all ranks' failures together: the limit must not depend on their number
    scored = counts > 0  # a video none of whose views decoded keeps -inf logits: it counts in the mAP, ranked last
    views = dataset.views_per_video
    return {f"{prefix}_map": mean_average_precision(logits, targets), f"{prefix}_chance_map": chance_map(targets),
            f"{prefix}_loss": F.binary_cross_entropy_with_logits(logits[scored], targets[scored].float()).item(),
            f"{prefix}_videos": dataset.num_videos, f"{prefix}_views": views,
            f"{prefix}_failed_videos": int((counts < views).sum())}


def result_line(stats: dict, prefix: str) -> str:
    """`test: mAP M (chance C)  loss L  (VIDEOS videos × VIEWS views)`."""
    return (f"{prefix}: mAP {stats[f'{prefix}_map']:.2f} (chance {stats[f'{prefix}_chance_map']:.2f})  "
            f"loss {stats[f'{prefix}_loss']:.4f}  "
            f"({stats[f'{prefix}_videos']} videos × {stats[f'{prefix}_views']} views)")


def make_task(args: argparse.Namespace, device) -> engine.Task:
    """BCE with logits on multi-hot targets, video mAP; the plateau policy reads the validation losses."""
    return engine.Task(loss=F.binary_cross_entropy_with_logits, metric="map", result_line=result_line,
                       evaluate=lambda m, d, p: evaluate(m, d, args, device, p), lr_scale=engine.plateau_policy(args))


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    check_args(args)
    run_dir = Path(args.output_dir or f"logs/{args.model}_charades")
    device, log = engine.start(args, run_dir)
    state, source = engine.starting_point(args, run_dir)
    spec = engine.resolve_input(args, state, charades.ORIGINAL_INPUT)
    task = make_task(args, device)
    test_views = args.test_views * args.test_crops

    if args.eval:  # ---- only the multi-view test of the given weights ----
        test_set = build_dataset(args, spec, "test", args.test_views, args.test_crops)
        engine.describe_data(test=test_set)
        return engine.test(engine.make_model(args, spec, test_set.num_classes, "clip", state, device), task, test_set)

    world = utils.get_world_size()
    schedule = engine.build_schedule(args, spec, world, default_lr=0.04 * args.batch_size * world / 32)
    stored = engine.finished_run(state, schedule, run_dir, task, test=test_views > 0)
    if stored is not None:
        return stored

    # ---- fine-tuning, --val-views clips per test video between epochs ----
    train_set, val_set = build_dataset(args, spec, "train"), build_dataset(args, spec, "test", args.val_views)
    model = engine.make_model(args, spec, val_set.num_classes, "clip", state, device)
    stats = engine.fit(model, task, schedule, train_set, val_set, args, device, run_dir, log, (state, source),
                       extras={"classes": list(val_set.classes), **charades.CHECKPOINT_INPUT})

    # ---- final multi-view test ----
    if test_views > 0:
        test_set = build_dataset(args, spec, "test", args.test_views, args.test_crops)
        stats.update(engine.test(model, task, test_set, log, schedule.num_epochs))
    return stats


if __name__ == "__main__":
    utils.launch(get_args_parser().parse_args(), main)
