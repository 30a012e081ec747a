"""Train X3D on Kinetics-400 with Multigrid, then evaluate with the 30-view protocol.

    python train_x3d_kinetics_multigrid.py -gpu 0,1,2,3 --data-root /data/kinetics400 --model x3d_m
    torchrun --nnodes 2 --nproc-per-node 8 ... train_x3d_kinetics_multigrid.py --data-root ... --model x3d_m
    python train_x3d_kinetics_multigrid.py --eval --resume logs/x3d_m_kinetics/checkpoint.pt --data-root ...

Multigrid (Wu et al., CVPR 2020) trains on a schedule of clip shapes that keeps batch × frames × height × width about
constant: coarse shapes with big batches early in each long cycle, the full shape at its end, and a per-iteration
short cycle of spatial sizes. The schedule is a pure function of the flags (multigrid.py), so a resumed run recomputes
it, and the per-sample seeds it hands the dataset make a resumed run repeat the same clips.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import engine
import utils
from checkpoints import convert_checkpoint, finetune_summary, load_finetune, load_weights
from kinetics_multigrid import KineticsDataset, build_kinetics
from multigrid import MultigridSchedule, ShortCycleBatchSampler
from x3d import MODELS, build_model, default_input, set_bn_splits

# Flags that shape a run: resuming a run folder with other values would mix two trainings, so it is refused.
RUN_FLAGS = ("model", "frames", "sampling_rate", "crop", "jitter", "test_crop", "flip_prob", "batch_size", "epochs",
             "lr", "lr_policy", "steps", "warmup_epochs", "weight_decay", "dropout", "clip_grad", "multigrid",
             "epoch_factor", "min_frames", "seed")
FEW_ITERATIONS = 10  # fewer steps than this per epoch at a shape: BN statistics and the LR curve get coarse


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of the Kinetics recipe."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True,
                   help="Kinetics folder: official CSVs + videos, `path label` list files, or the original "
                        "repository's JSON + labels.txt + frame folders (detected automatically).")
    p.add_argument("--model", default="x3d_m", choices=sorted(MODELS), help="X3D variant (default: X3D-M).")
    g = p.add_argument_group("input (defaults: the variant's own, see x3d.py)")
    g.add_argument("--frames", type=int, help="Frames per clip at the base (full) multigrid shape.")
    g.add_argument("--sampling-rate", type=int, help="Frame stride in 30-fps units at the base shape.")
    g.add_argument("--crop", type=int, help="Training crop at the base shape.")
    g.add_argument("--jitter", type=int, nargs=2, metavar=("MIN", "MAX"), help="Short-side scale jitter range.")
    g.add_argument("--test-crop", type=int, help="Crop of the 3-crop test (short side resized to it).")
    g.add_argument("--flip-prob", type=float, default=0.5,
                   help="Probability of a horizontal flip in training; 0 where left and right differ (the demo).")
    g.add_argument("--backend", default="auto", choices=["auto", "pyav", "torchcodec"], help="Video decoder.")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=16,
                   help="Clips per device at the base shape; multigrid multiplies it at coarser shapes. 16 per "
                        "device on 8 GPUs is X3D's batch of 128.")
    g.add_argument("--epochs", type=int, default=300,
                   help="Epochs of the fixed-shape recipe (X3D: 300). Multigrid derives its schedule from it, "
                        "stretching it by --epoch-factor as the paper does.")
    g.add_argument("--lr", type=float, default=None,
                   help="Learning rate at the base shape. Default: 0.1 per 128 clips of global batch (X3D's rule).")
    g.add_argument("--lr-policy", default="cosine", choices=["cosine", "steps"], help="X3D uses cosine.")
    g.add_argument("--steps", type=int, nargs="*", default=None, help="Epochs where a step schedule decays ×0.1.")
    g.add_argument("--warmup-epochs", type=float, default=35.0, help="Linear warm-up length (X3D: 35 of 300).")
    g.add_argument("--weight-decay", type=float, default=5e-5, help="On conv/linear weights only (X3D: 5e-5).")
    g.add_argument("--dropout", type=float, default=0.5, help="Dropout before the classifier (X3D: 0.5).")
    g.add_argument("--clip-grad", type=float, default=None, help="Clip the gradient norm to this value.")
    g.add_argument("--multigrid", default="both", choices=["both", "long", "short", "none"],
                   help="Which multigrid cycles to use; `none` is the plain fixed-shape recipe.")
    g.add_argument("--epoch-factor", type=float, default=1.5,
                   help="Multigrid stretches the epoch count by this factor (the paper's 1.5).")
    g.add_argument("--min-frames", type=int, default=1,
                   help="Fewest frames of a long-cycle shape (1: the paper's T0/4 even where that is 1 frame).")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="Only evaluate (the multi-view test) and exit.")
    g.add_argument("--eval-every", type=int, default=10,
                   help="Epochs between quick evaluations (one centre clip per video) during training.")
    g.add_argument("--precise-bn-batches", type=int, default=200,
                   help="Training batches used to recompute BN statistics before each evaluation (0: off).")
    g.add_argument("--test-views", type=int, default=10, help="Temporal clips per video in the final test.")
    g.add_argument("--test-crops", type=int, default=3, choices=[1, 3], help="Spatial crops per clip in the test.")
    g.add_argument("--max-failure-fraction", type=float, default=0.1,
                   help="Stop if more than this fraction of videos fails to decode (each failure is skipped).")
    return utils.add_common_args(p)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks of main()
# ----------------------------------------------------------------------------------------------------------------------
def resolve_input(args: argparse.Namespace, stored_cfg: dict | None = None) -> dict:
    """The input a checkpoint was trained on (else the variant's default), overridden by any flag given."""
    spec = default_input(stored_cfg["name"] if stored_cfg else args.model)
    if stored_cfg:
        spec.update({key: stored_cfg[key] for key in spec if key in stored_cfg})
    spec["train_jitter"] = tuple(spec["train_jitter"])
    for key, flag in [("frames", "frames"), ("sampling_rate", "sampling_rate"), ("train_crop", "crop"),
                      ("train_jitter", "jitter"), ("test_crop", "test_crop")]:
        if getattr(args, flag) is not None:
            spec[key] = tuple(getattr(args, flag)) if key == "train_jitter" else getattr(args, flag)
    return spec


def check_args(args: argparse.Namespace) -> None:
    """Every flag combination that cannot work, named by its flags, before any data is indexed or model built."""
    spec, steps = resolve_input(args), args.steps or []
    need = [
        (Path(args.data_root).is_dir(), f"--data-root {args.data_root} does not exist or is not a folder"),
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (0 <= args.warmup_epochs < args.epochs,
         f"--warmup-epochs {args.warmup_epochs:g} must be in [0, --epochs {args.epochs}) (the default is X3D's 35 of "
         f"300 epochs; give a shorter warm-up for a shorter run)"),
        (args.lr is None or args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.lr_policy != "steps" or bool(args.steps), "--lr-policy steps needs --steps (epochs where the LR decays)"),
        (all(a < b for a, b in zip([-1, *steps], steps)) and all(s < args.epochs for s in steps),
         f"--steps {steps} must increase and stay below --epochs {args.epochs}"),
        (args.lr_policy != "steps" or args.multigrid in ("short", "none") or any(steps),
         "--lr-policy steps with the long cycle (--multigrid both/long) needs a --steps epoch after 0"),
        (args.epoch_factor > 0, f"--epoch-factor must be positive, got {args.epoch_factor}"),
        (min(spec["frames"], spec["sampling_rate"]) >= 1, "--frames and --sampling-rate must be at least 1"),
        (spec["train_crop"] >= 4 and spec["test_crop"] >= 1, "--crop must be at least 4 and --test-crop at least 1"),
        (spec["train_crop"] <= spec["train_jitter"][0] <= spec["train_jitter"][1],
         f"--jitter {list(spec['train_jitter'])} must be MIN <= MAX with MIN at least --crop {spec['train_crop']}"),
        (0 <= args.flip_prob <= 1 and 0 <= args.dropout < 1, "--flip-prob must be in [0, 1] and --dropout in [0, 1)"),
        (args.clip_grad is None or args.clip_grad > 0, f"--clip-grad must be positive, got {args.clip_grad}"),
        (0 <= args.max_failure_fraction <= 1, f"--max-failure-fraction must be in [0, 1], got "
                                                f"{args.max_failure_fraction}"),
        (args.eval_every >= 1 and args.test_views >= 0 and args.precise_bn_batches >= 0,
         "--eval-every must be at least 1, --test-views and --precise-bn-batches at least 0"),
        (args.save_every >= 0 and args.workers >= 0 and args.nproc >= 1,
         "--save-every and --workers must be at least 0, --nproc at least 1"),
        (not (args.restart and (args.eval or args.resume)), "--restart starts the run folder over: it cannot be "
                                                             "combined with --eval or --resume"),
        (args.gpu is None or all(d.strip().isdigit() for d in args.gpu.split(",")),
         f"-gpu takes comma-separated device numbers like 0,1,2,3, got {args.gpu!r}"),
    ]
    for ok, message in need:
        if not ok:
            raise utils.UserError(message)
    utils.check_device(args.gpu, args.device)


def check_same_run(args: argparse.Namespace, saved: dict, source: Path) -> None:
    """Refuse to resume a checkpoint trained with other run-shaping flags (RUN_FLAGS), naming every difference."""
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    def shown(value):
        return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    changed = [f"--{k.replace('_', '-')} {shown(getattr(args, k))} (the run has {shown(saved[k])})"
               for k in RUN_FLAGS if k in saved and hasattr(args, k) and plain(saved[k]) != plain(getattr(args, k))]
    if changed:
        raise utils.UserError(
            f"{source} was trained with other settings: {'; '.join(changed)}. Give the run's own flags to resume it "
            f"(they are in its args.json), pass --restart to start the folder over, or choose another --output-dir.")


def check_iterations(schedule: MultigridSchedule, num_samples: int, world: int, batch_size: int) -> list[str]:
    """Refuse a schedule where a shape would take no step per epoch; warnings for shapes with very few steps.

    Incomplete batches are dropped (BN splits need exact sizes), so a shape whose first, largest short-cycle batch
    exceeds the videos per process would train nothing at all and the run would end at chance.
    """
    per_rank = math.ceil(num_samples / world)
    iters = {s: schedule.iterations(s.start, num_samples, world) for s in schedule.stages}
    need = max(s.short_cycle[0][1] for s in schedule.stages)  # an epoch's first batch: the short cycle's largest
    if min(iters.values()) == 0:
        fits = batch_size * per_rank // need  # every batch scales with --batch-size
        fix = (f"use --batch-size {fits} or less" if fits >= 1 else
               "use --multigrid none, more training videos or fewer processes")
        raise utils.UserError(
            f"{num_samples} training videos are {per_rank} per process ({world} process{'es' if world > 1 else ''}), "
            f"fewer than the largest batch of the schedule, {need} clips (--batch-size {batch_size} × "
            f"{need // batch_size} at the coarsest multigrid shape, short cycle included): epochs at that shape would "
            f"take no training step (incomplete batches are dropped). To fix it, {fix}.")
    few = sorted({(s.frames, s.crop, n) for s, n in iters.items() if n < FEW_ITERATIONS})
    return [f"warning: only {n} training step{'s' if n > 1 else ''} per epoch at shape {t}x{c} (fewer than "
            f"{FEW_ITERATIONS}); a smaller --batch-size or more data gives more" for t, c, n in few]


def check_failures(dataset, device: torch.device) -> int:
    """Videos that failed to decode on any rank; every rank stops together past --max-failure-fraction."""
    return dataset.failures.check(utils.any_rank(dataset.failures.failed, device))


def finished_run(run_dir: Path, args: argparse.Namespace) -> dict | None:
    """The stored test result of a run whose training is over, if its test was run (or none is wanted)."""
    path = run_dir / "log.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    tested = [r for r in records if "test_top1" in r]
    if tested:
        return tested[-1]
    return {} if args.test_views * args.test_crops == 0 else None


def build_datasets(args: argparse.Namespace, spec: dict, test_views: int, test_crops: int):
    """Training set and the multi-view evaluation set."""
    common = dict(frames=spec["frames"], sampling_rate=spec["sampling_rate"], train_crop=spec["train_crop"],
                  train_jitter=spec["train_jitter"], test_crop=spec["test_crop"], backend=args.backend,
                  max_failure_fraction=args.max_failure_fraction)
    train_set = None if args.eval else build_kinetics(args.data_root, "train", mode="train",
                                                      flip_prob=args.flip_prob, **common)
    val_set = build_kinetics(args.data_root, "val", mode="test", num_temporal_views=test_views,
                             num_spatial_crops=test_crops, **common)
    return train_set, val_set


def build_schedule(args: argparse.Namespace, spec: dict, world_size: int) -> MultigridSchedule:
    """The multigrid (or fixed-shape) schedule: shapes, batch sizes, BN splits and LR per fractional epoch."""
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size * world_size / 128
    return MultigridSchedule(
        epochs=args.epochs, base_batch=args.batch_size, base_frames=spec["frames"], base_crop=spec["train_crop"],
        base_rate=spec["sampling_rate"], lr=lr, lr_policy=args.lr_policy, warmup_epochs=args.warmup_epochs,
        steps=args.steps, long_cycle=args.multigrid in ("both", "long"),
        short_cycle=args.multigrid in ("both", "short"), epoch_factor=args.epoch_factor, world_size=world_size,
        min_frames=args.min_frames)


def eval_loader(dataset, args: argparse.Namespace) -> DataLoader:
    """Each view goes to exactly one rank (no padding), so results do not depend on the number of processes."""
    sampler = range(utils.get_rank(), len(dataset), utils.get_world_size())
    return DataLoader(dataset, batch_size=max(1, args.batch_size), sampler=sampler, num_workers=args.workers,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=utils.ignore_sigint)


def train_loader(dataset, schedule, epoch: int, args: argparse.Namespace, start_iter: int = 0,
                 short_cycle: bool = True, end_epoch: int | None = None) -> DataLoader:
    """Batches from `epoch` (after `start_iter`) to `end_epoch`; the batch sampler picks shapes per iteration.

    One loader for all remaining epochs keeps its workers, which prefetch the next epoch's first batches while the
    current epoch ends, evaluates and saves: with a small data set and multigrid's large batches an epoch is only a
    few iterations long, and a fresh loader per epoch would make the loop wait for its first batch every time.
    """
    sampler = ShortCycleBatchSampler(len(dataset), schedule, epoch=epoch, rank=utils.get_rank(),
                                     world_size=utils.get_world_size(), seed=args.seed, start_iter=start_iter,
                                     short_cycle=short_cycle, end_epoch=end_epoch)
    # A private generator keeps loader start-up from consuming the global RNG (dropout draws are seeded per step).
    return DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(args.seed + epoch), worker_init_fn=utils.ignore_sigint)


def evaluate(model, dataset: KineticsDataset, args, device, prefix: str) -> dict:
    """Video-level top-1/top-5 from the mean softmax over each video's views."""
    scores, labels, counts = engine.predict_videos(
        model, eval_loader(dataset, args), dataset.num_videos, dataset.num_classes, device,
        amp=args.amp, progress=not args.no_progress)
    check_failures(dataset, device)  # all ranks' failures together: the limit must not depend on the process count
    scored = counts > 0  # a video none of whose views decoded is reported, not scored
    k5 = min(5, dataset.num_classes)
    acc = engine.topk_accuracy(scores[scored], labels[scored], ks=(1, k5))
    views = dataset.num_temporal_views * dataset.num_spatial_crops
    stats = {f"{prefix}_top1": acc[1], f"{prefix}_top5": acc[k5], f"{prefix}_videos": int(scored.sum()),
             f"{prefix}_views": views, f"{prefix}_failed_videos": int((counts < views).sum())}
    if prefix == "test":  # per-class top-1 and their mean (mean class accuracy), for the final test only
        per_class = engine.per_class_top1(scores[scored], labels[scored], dataset.num_classes)
        stats[f"{prefix}_mean_class_top1"] = sum(per_class.values()) / max(len(per_class), 1)
        stats[f"{prefix}_class_top1"] = {dataset.classes[k]: v for k, v in per_class.items()}
    return stats


def restart(run_dir: Path) -> None:
    """--restart: rank 0 moves the run folder's files aside before any rank looks for a checkpoint."""
    if utils.is_main_process():
        moved = utils.start_over(run_dir)
        print(f"--restart: the previous run's files are moved to {moved}" if moved else
              f"--restart: {run_dir} holds no previous run")
    if utils.get_world_size() > 1:
        torch.distributed.barrier()


def restore(ckpt: dict, model, optimizer, scaler) -> tuple[int, int, float]:
    """Load a full training state; returns (epoch, iteration within it, best metric)."""
    model.load_state_dict(ckpt["model"])
    if optimizer is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt.get("epoch", 0)), int(ckpt.get("iteration", 0)), float(ckpt.get("best_metric", 0.0))


# ----------------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    check_args(args)
    device = utils.init_distributed(args.device)
    rank0, world = utils.is_main_process(), utils.get_world_size()
    torch.backends.cudnn.benchmark = True  # shapes repeat within each long-cycle stage
    run_dir = Path(args.output_dir or f"logs/{args.model}_kinetics")
    if rank0:
        print(utils.describe_device(device))
    if args.restart:
        restart(run_dir)
    log = utils.RunLogger(run_dir, tensorboard=args.tensorboard)
    utils.seed_everything(args.seed)

    # ---- where to start: weights to evaluate (any format), the run's own checkpoint to resume, or scratch ----
    if args.eval:
        state, notes = convert_checkpoint(args.resume or run_dir / "checkpoint.pt")
        if rank0:
            print(notes[0])
    else:
        found = utils.load_run_checkpoint(run_dir, args.resume)
        state = found[0] if found else None
        if state is not None and isinstance(state.get("args"), dict):
            check_same_run(args, state["args"], found[1])
    stored_cfg = state.get("model_cfg") if state else None
    spec = resolve_input(args, stored_cfg)
    schedule = None if args.eval else build_schedule(args, spec, world)
    if state is not None and not args.eval and int(state.get("epoch", 0)) >= schedule.num_epochs:
        stored = finished_run(run_dir, args)
        if stored is not None:  # trained and tested: say so instead of appending another test
            if rank0:
                print(f"{run_dir}: this run is finished ({schedule.num_epochs} epochs)"
                      + (f"; its {_result_line(stored, 'test')}" if stored else "")
                      + ". Pass --eval to evaluate it again, or --restart to train it again.")
            return stored

    # ---- data and model ----
    test_views, test_crops = (args.test_views, args.test_crops) if args.eval else (1, 1)
    train_set, val_set = build_datasets(args, spec, test_views, test_crops)
    if stored_cfg and stored_cfg.get("num_classes", val_set.num_classes) != val_set.num_classes:
        raise utils.UserError(f"the checkpoint has {stored_cfg['num_classes']} classes but {args.data_root} has "
                              f"{val_set.num_classes}; use --finetune to start from weights of another class count")
    warnings = [] if args.eval else check_iterations(schedule, len(train_set), world, args.batch_size)
    model = build_model(stored_cfg["name"] if stored_cfg else args.model, num_classes=val_set.num_classes,
                        dropout=args.dropout)
    model.cfg = dataclasses.replace(model.cfg, **spec)  # checkpoints record the input actually trained on
    if args.finetune and state is None:
        report = load_finetune(model, load_weights(args.finetune)[0], args.finetune)
        if rank0:
            print(finetune_summary(report))
    model.to(device).to(memory_format=torch.channels_last_3d)
    # Sub-batch BN keeps per-rank statistics (synchronised before evaluation), so buffers are not broadcast.
    net = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    optimizer = engine.build_optimizer(model, lr=0.0, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and args.amp == "fp16" else None
    start_epoch, start_iter, best = 0, 0, 0.0
    if state is not None:
        start_epoch, start_iter, best = restore(state, model, None if args.eval else optimizer, scaler)
        if rank0 and not args.eval:
            print(f"Resumed from {found[1]}: epoch {start_epoch}, iteration {start_iter}")

    if args.eval:
        stats = evaluate(model, val_set, args, device, "test")
        if rank0:
            print(_result_line(stats, "test"))
        return stats

    if rank0:
        utils.write_json(vars(args), run_dir / "args.json")
        lr_curve = [(e / 20, schedule.lr_at(e / 20)) for e in range(20 * schedule.num_epochs + 1)]
        utils.write_json({"stages": [dataclasses.asdict(s) for s in schedule.stages], "lr": lr_curve},
                         run_dir / "schedule.json")
        print(schedule.table(len(train_set), world))
        for warning in warnings:
            print(warning, file=sys.stderr)

    def checkpoint(epoch: int, iteration: int) -> None:
        if rank0:
            utils.save_run_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "iteration": iteration,
                "best_metric": best, "args": vars(args), "model_cfg": dataclasses.asdict(model.cfg),
                "classes": list(val_set.classes)}, run_dir)

    # ---- training ----
    criterion = F.cross_entropy
    stats = {}
    loader = train_loader(train_set, schedule, start_epoch, args, start_iter=start_iter, end_epoch=schedule.num_epochs)
    batches = iter(loader)
    stop = utils.StopRequest()  # Ctrl-C: finish the step, save, print how to resume (the loop's handler)
    for epoch in stop.during(range(start_epoch, schedule.num_epochs)):
        shape = schedule.shape_at(epoch)
        set_bn_splits(model, shape.bn_splits, shape.bn_sync)
        num_iters = loader.batch_sampler.batches_in(epoch)
        train_stats = engine.train_one_epoch(
            net, itertools.islice(batches, num_iters - start_iter), optimizer, criterion, epoch=epoch,
            num_iters=num_iters, lr_at=schedule.lr_at, device=device, seed=args.seed, start_iter=start_iter,
            amp=args.amp, scaler=scaler, clip_grad=args.clip_grad, save_fn=lambda it, e=epoch: checkpoint(e, it),
            save_every=args.save_every, progress=not args.no_progress, should_stop=stop)
        start_iter = 0
        stats = {f"train_{k}": v for k, v in train_stats.items()}
        stats.update(shape=f"{shape.frames}x{shape.crop}", batch=shape.batch_size, bn_splits=shape.bn_splits,
                     failed_samples=check_failures(train_set, device))
        last = epoch + 1 == schedule.num_epochs
        if (epoch + 1) % args.eval_every == 0 or last:
            stats.update(_quick_eval(model, train_set, val_set, schedule, epoch, args, device))
            best = max(best, stats["val_top1"])
        checkpoint(epoch + 1, 0)
        log.log(stats, epoch + 1)
        if rank0:
            print(f"epoch {epoch + 1}/{schedule.num_epochs}  " + "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()
                if not isinstance(v, dict)))

    del batches, loader  # stops the training loader's workers before the test starts its own

    # ---- final multi-view test ----
    if args.test_views * args.test_crops > 0:
        _, test_set = build_datasets(argparse.Namespace(**{**vars(args), "eval": True}), spec,
                                     args.test_views, args.test_crops)
        test_stats = evaluate(model, test_set, args, device, "test")
        log.log(test_stats, schedule.num_epochs)
        stats.update(test_stats)
        if rank0:
            print(_result_line(test_stats, "test"))
    return stats


def _quick_eval(model, train_set, val_set, schedule, epoch, args, device) -> dict:
    """Precise BN at the base shape, then one centre clip per video.

    The validation clips have the base shape whatever the long cycle trains at, so the BN statistics are taken on
    training batches of that shape (the last epoch's): statistics of 2-frame clips make an 8-frame clip look
    out of distribution and cost tens of points in the middle of a long cycle.
    """
    out = {}
    if args.precise_bn_batches > 0:
        final = schedule.num_epochs - 1
        loader = train_loader(train_set, schedule, final, args, short_cycle=False)
        set_bn_splits(model, schedule.shape_at(final).bn_splits, schedule.shape_at(final).bn_sync)
        out["precise_bn_batches"] = engine.precise_bn(model, loader, args.precise_bn_batches, device, amp=args.amp)
        set_bn_splits(model, schedule.shape_at(epoch).bn_splits, schedule.shape_at(epoch).bn_sync)
    out.update(evaluate(model, val_set, args, device, "val"))
    return out


def _result_line(stats: dict, prefix: str) -> str:
    mean_class = stats.get(f"{prefix}_mean_class_top1")
    return (f"{prefix}: video top-1 {stats[f'{prefix}_top1']:.2f}  top-5 {stats[f'{prefix}_top5']:.2f}  "
            + (f"mean class top-1 {mean_class:.2f}  " if mean_class is not None else "")
            + f"({stats[f'{prefix}_videos']} videos × {stats[f'{prefix}_views']} views)")


if __name__ == "__main__":
    utils.launch(get_args_parser().parse_args(), main)
