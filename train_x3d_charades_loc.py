"""Fine-tune X3D on Charades for temporal localization: per-frame scores of its 157 actions, per-frame mAP.

    python train_x3d_charades_loc.py -gpu 0,1 --data-root /data/charades --finetune models/x3d_m_kinetics.pt
    python train_x3d_charades_loc.py --eval --resume logs/x3d_m_charades_loc/checkpoint.pt --data-root /data/charades

The recipe of train_x3d_charades.py (the original repository's defaults; 17.71 per-frame mAP with X3D-M there), with
X3D's per-frame head, which pools space only and classifies every frame: (N, K, T) logits. A training clip's targets
are the classes of each sampled frame; the loss is the mean of the per-frame binary cross-entropy and that of the
time-max of the logits against the clip's labels, as in the original repository.

Evaluation is the standard localization protocol (Charades_v1_localize.m, charades.py): every test video is covered by
half-overlapping clips of the training length whose per-frame logits are averaged where they overlap (with 3 crops,
the maximum over crops), 25 equally spaced frames of it are scored, and the per-frame mAP is the mean over classes of
the AP over all (video, frame) rows. Every test video counts, one without actions or one that failed to decode too.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import charades
import engine
import utils
from charades import LOCALIZATION_POINTS, CharadesDataset, localization_frame_indices, localization_map
from x3d import MODELS, fold_batchnorm


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of the Charades localization recipe."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True,
                   help="Charades folder: Charades_v1_train.csv and Charades_v1_test.csv (or the original repository's "
                        "charades.json), the frames Charades_v1_rgb/<id>/<id>-000001.jpg or the videos, and "
                        "optionally Charades_v1_classes.txt for the class names.")
    utils.add_input_args(p, sorted(MODELS), rate_unit="Charades' 24-fps frames (default: 16 frames at rate 10)")
    utils.add_optimisation_args(p, lr_rule="0.04 per 32 clips (the original recipe)",
                                lr_policies=("plateau", "cosine", "steps"))
    utils.add_evaluation_args(p, temporal_views=False)  # the clips of a test video cover all of it
    utils.add_common_args(p)
    p.set_defaults(epochs=100, warmup_epochs=0.0, weight_decay=1e-5, multigrid="none", eval_every=1,
                   precise_bn_batches=0, test_crops=1)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Every flag combination that cannot work, named by its flags, before any data is indexed or model built."""
    utils.check_args(args, engine.resolve_input(args, None, charades.ORIGINAL_INPUT))


# ----------------------------------------------------------------------------------------------------------------------
# The task: data, loss, evaluation
# ----------------------------------------------------------------------------------------------------------------------
def build_dataset(args: argparse.Namespace, spec: dict, split: str, crops: int = 1) -> CharadesDataset:
    """The training set of per-frame targets (split "train"), or whole test videos in `crops` crops (split "test")."""
    common = dict(task="loc", **charades.dataset_options(spec, args.backend, args.max_failure_fraction))
    if split == "train":
        return CharadesDataset(args.data_root, split="train", mode="train", flip_prob=args.flip_prob, **common)
    return CharadesDataset(args.data_root, split="test", mode="test", num_spatial_crops=crops, **common)


def localization_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of the per-frame BCE and the BCE of the time-max (the clip's labels); logits and targets (N, K, T)."""
    per_frame = F.binary_cross_entropy_with_logits(logits, targets)
    per_clip = F.binary_cross_entropy_with_logits(logits.amax(2), targets.amax(2))
    return (per_frame + per_clip) / 2


@torch.no_grad()
def video_logits(model, video: torch.Tensor, window: int, batch_size: int, device, amp: str) -> torch.Tensor:
    """(K, T) per-frame logits of a whole (C, T, H, W) video from half-overlapping clips of `window` frames, averaged
    where they overlap: the model sees clips of the length it was trained on, whatever the video's length."""
    length = video.shape[1]
    window = min(window, length)
    starts = list(range(0, length - window + 1, max(1, window // 2)))
    if starts[-1] != length - window:
        starts.append(length - window)  # the last clip ends with the video
    outputs = []
    for i in range(0, len(starts), batch_size):
        clips = torch.stack([video[:, s : s + window] for s in starts[i : i + batch_size]])  # (B, C, window, H, W)
        with engine.autocast(device, amp):
            outputs.append(model(engine.to_device(clips, device)).float().cpu())  # (B, K, window)
    logits = torch.cat(outputs)
    total, count = torch.zeros(logits.shape[1], length), torch.zeros(length)
    for start, clip_logits in zip(starts, logits):
        total[:, start : start + window] += clip_logits
        count[start : start + window] += 1
    return total / count


@torch.no_grad()
def evaluate(model, dataset: CharadesDataset, args, device, prefix: str) -> dict:
    """Per-frame mAP of the localization protocol, and the loss over whole videos (the plateau policy's signal)."""
    model.eval()
    model = fold_batchnorm(model)  # an eval-mode copy with BN folded into the convolutions: the same outputs
    scores = torch.full((dataset.num_videos, dataset.num_classes, LOCALIZATION_POINTS), -math.inf,
                        dtype=torch.float64)  # a frame without a prediction scores -inf
    views, sums = torch.zeros(dataset.num_videos, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    loader = engine.eval_loader(dataset, args, batch_size=1)  # one whole video (one crop) per item: lengths differ
    for clip, target, video, view in tqdm(loader, disable=args.no_progress or not utils.is_main_process(),
                                          desc="eval", dynamic_ncols=True, leave=False):
        if view.item() < 0:  # the video failed to decode
            continue
        logits = video_logits(model, clip[0], dataset.frames, args.batch_size, device, args.amp)  # (K, T)
        sums += torch.tensor([localization_loss(logits[None], target.float()).item(), 1.0], dtype=torch.float64)
        picked = logits[:, localization_frame_indices(logits.shape[1])].double()  # (K, 25)
        torch.maximum(scores[video.item()], picked, out=scores[video.item()])  # the maximum over crops
        views[video.item()] += 1
    if utils.get_world_size() > 1:  # each view was scored on exactly one rank
        dist.all_reduce(scores, op=dist.ReduceOp.MAX)
        dist.all_reduce(views)
        dist.all_reduce(sums)
    engine.check_failures(dataset, device)  # all ranks' failures together: the limit must not depend on their number
    targets = torch.stack([charades.localization_targets(v, dataset.num_classes) for v in dataset.videos])
    rows = targets.permute(0, 2, 1).reshape(-1, dataset.num_classes)  # the (video, frame) rows the protocol scores
    return {f"{prefix}_map": localization_map(scores, targets), f"{prefix}_chance_map": charades.chance_map(rows),
            f"{prefix}_loss": (sums[0] / sums[1].clamp(min=1)).item(), f"{prefix}_videos": dataset.num_videos,
            f"{prefix}_views": dataset.views_per_video,
            f"{prefix}_failed_videos": int((views < dataset.views_per_video).sum())}


def result_line(stats: dict, prefix: str) -> str:
    """`test: per-frame mAP M (chance C)  loss L  (VIDEOS videos, 25 frames each, 1 crop)`."""
    crops = stats[f"{prefix}_views"]
    return (f"{prefix}: per-frame mAP {stats[f'{prefix}_map']:.2f} (chance {stats[f'{prefix}_chance_map']:.2f})  "
            f"loss {stats[f'{prefix}_loss']:.4f}  "
            f"({stats[f'{prefix}_videos']} videos, {LOCALIZATION_POINTS} frames each, "
            f"{crops} crop{'s' if crops > 1 else ''})")


def make_task(args: argparse.Namespace, device) -> engine.Task:
    """Per-frame and time-max BCE, per-frame mAP; the plateau policy reads the validation losses."""
    return engine.Task(loss=localization_loss, metric="map", result_line=result_line,
                       evaluate=lambda m, d, p: evaluate(m, d, args, device, p), lr_scale=engine.plateau_policy(args))


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    check_args(args)
    run_dir = Path(args.output_dir or f"logs/{args.model}_charades_loc")
    device, log = engine.start(args, run_dir)
    state, source = engine.starting_point(args, run_dir)
    spec = engine.resolve_input(args, state, charades.ORIGINAL_INPUT)
    task = make_task(args, device)

    if args.eval:  # ---- only the localization test of the given weights ----
        test_set = build_dataset(args, spec, "test", args.test_crops)
        engine.describe_data(test=test_set)
        return engine.test(engine.make_model(args, spec, test_set.num_classes, "frame", state, device), task, test_set)

    world = utils.get_world_size()
    schedule = engine.build_schedule(args, spec, world, default_lr=0.04 * args.batch_size * world / 32)
    stored = engine.finished_run(state, schedule, run_dir, task, test=True)
    if stored is not None:
        return stored

    # ---- fine-tuning, the localization protocol on the centre crop between epochs ----
    train_set, val_set = build_dataset(args, spec, "train"), build_dataset(args, spec, "test")
    model = engine.make_model(args, spec, val_set.num_classes, "frame", state, device)
    stats = engine.fit(model, task, schedule, train_set, val_set, args, device, run_dir, log, (state, source),
                       extras={"classes": list(val_set.classes), **charades.CHECKPOINT_INPUT})

    # ---- final test ----
    test_set = build_dataset(args, spec, "test", args.test_crops)
    stats.update(engine.test(model, task, test_set, log, schedule.num_epochs))
    return stats


if __name__ == "__main__":
    utils.launch(get_args_parser().parse_args(), main)
