"""Shared plumbing for the recipes: checkpoint files, distributed set-up, seeding, logging.

Modules never read `args`; the recipes pass explicit values in.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint file that cannot or must not be loaded; the message names the file and the reason."""


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Load a checkpoint with `weights_only=True`: plain tensors and containers only, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e)
        if "Unsupported global" in detail or "reduce" in detail.lower():
            # weights_only refuses any pickle that would import and call something (a class, a function, a
            # Namespace). Such a file could run code on load, so it is refused rather than loaded unsafely.
            what = next((line.strip() for line in detail.splitlines() if "Unsupported global" in line), "")
            raise CheckpointError(
                f"{path}: refused: unpickling it would execute code or build objects other than tensors and plain "
                f"containers, which is unsafe ({what or 'torch.load(weights_only=True) rejected it'}). "
                "Re-save it from a trusted environment as a dict of tensors and plain data."
            ) from e
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?)") from e
    except Exception as e:  # truncated zip, garbage bytes, I/O errors: torch raises many types here
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(obj).__name__}")
    return obj


def _temp_path(path: Path) -> Path:
    """A hidden file beside `path`, private to this process, to write before renaming over `path`."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def save_checkpoint(obj: dict, *paths: str | os.PathLike) -> None:
    """Write `obj` to each path atomically: a temp file in the same folder, fsync, then rename over the target.

    A run killed mid-write leaves the previous file intact (rename is atomic on POSIX filesystems).
    """
    for path in paths:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# Launch and distributed set-up: one path (torchrun / DDP), a single process when there is nothing to distribute
# ----------------------------------------------------------------------------------------------------------------------
def launch(args: argparse.Namespace, main: Callable[[argparse.Namespace], object]) -> None:
    """Run `main(args)` here, or relaunch this script through torch's elastic launcher with one process per device.

    `-gpu 0,1,2,3` restricts CUDA to those devices and starts one DDP process each; `--nproc N` starts N CPU (gloo)
    processes. Under torchrun (RANK set) or with a single device, `main` runs in this process.
    """
    if args.gpu is not None:
        # Must happen before CUDA is initialised anywhere in this process (and is inherited by the workers).
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    nproc = len(args.gpu.split(",")) if args.gpu else args.nproc
    if nproc <= 1 or "RANK" in os.environ:
        main(args)
        return
    from torch.distributed import run as torchrun

    # Same script, same flags but --nproc (torchrun's parser would take it for its own --nproc-per-node); the workers
    # see RANK and therefore run main() directly.
    argv = [a for a in sys.argv[1:] if not a.startswith("--nproc=")]
    if "--nproc" in argv:
        i = argv.index("--nproc")
        del argv[i:i + 2]
    torchrun.main(["--standalone", f"--nproc-per-node={nproc}", sys.argv[0], *argv])


def init_distributed() -> torch.device:
    """Join the process group when launched by torchrun (env://) and return this process's device."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 when not distributed."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (the process that logs and writes files)."""
    return get_rank() == 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------------
# Logging: one JSON line per epoch / evaluation, optional TensorBoard
# ----------------------------------------------------------------------------------------------------------------------
class RunLogger:
    """Appends metric dicts to `<run>/log.jsonl` (rank 0 only) and mirrors scalars to TensorBoard if asked."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False):
        self.path = Path(run_dir) / "log.jsonl"
        self.writer = None
        if tensorboard and is_main_process():
            from torch.utils.tensorboard import SummaryWriter  # optional dependency, imported only when asked for

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, stats: dict, step: float) -> None:
        """Write one line; `step` is the (fractional) epoch."""
        if not is_main_process():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": step, **stats}) + "\n")
        if self.writer is not None:
            for key, value in stats.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, global_step=round(step * 1000))
            self.writer.flush()


def write_json(obj: object, path: str | os.PathLike) -> None:
    """Write JSON atomically (rank 0 decides whether to call this)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# Command-line flags shared by the three recipes
# ----------------------------------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every recipe has: devices, run folder, checkpoints, precision, loader workers, seed."""
    g = parser.add_argument_group("devices and run")
    g.add_argument("-gpu", "--gpu", default=None,
                   help="Comma-separated CUDA devices, e.g. 0,1,2,3: one DDP process per device (the original "
                        "repository's interface). Default: all visible devices of a torchrun launch, else the CPU.")
    g.add_argument("--nproc", type=int, default=1,
                   help="Number of CPU processes (gloo) when no GPU is used; >1 is for testing the distributed path.")
    g.add_argument("--output-dir", default=None,
                   help="Run folder for args.json, log.jsonl, checkpoints and plots. Default: logs/<model>_<dataset>. "
                        "Re-running the same command resumes from the checkpoint found there.")
    g.add_argument("--resume", default=None, help="Checkpoint to resume from (weights, optimizer, epoch, iteration).")
    g.add_argument("--finetune", default=None,
                   help="Checkpoint to initialise the weights from (any supported format; a classifier of another "
                        "size is dropped). Optimizer and epoch start fresh.")
    g.add_argument("--save-every", type=int, default=500,
                   help="Also write a checkpoint every N iterations, so a killed run loses at most N iterations.")
    g.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"],
                   help="Autocast precision on CUDA (bf16 needs no loss scaling). Ignored on the CPU, where measured "
                        "bf16 autocast was slower than fp32.")
    g.add_argument("--workers", type=int, default=8, help="Data-loading processes per training process.")
    g.add_argument("--seed", type=int, default=0, help="Seed for sampling, augmentation and initialisation.")
    g.add_argument("--tensorboard", action="store_true", help="Also write TensorBoard scalars to <run>/tb.")
    g.add_argument("--no-progress", action="store_true", help="Disable the progress bar (e.g. for log files).")
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# The run folder's checkpoints: the latest, and the one before it in case the latest is damaged
# ----------------------------------------------------------------------------------------------------------------------
def save_run_checkpoint(obj: dict, run_dir: str | os.PathLike) -> Path:
    """Write `<run>/checkpoint.pt` atomically, keeping the one it replaces as `checkpoint_prev.pt`.

    `checkpoint.pt` exists at every instant once written: the previous file is hard-linked (copied where links are
    not supported) to `checkpoint_prev.pt` and the new one is renamed over it, so a kill at any point leaves a
    complete latest checkpoint.
    """
    latest, previous = Path(run_dir) / "checkpoint.pt", Path(run_dir) / "checkpoint_prev.pt"
    if latest.exists():
        tmp = _temp_path(previous)
        tmp.unlink(missing_ok=True)
        try:
            os.link(latest, tmp)
        except OSError:
            shutil.copyfile(latest, tmp)
        os.replace(tmp, previous)
    save_checkpoint(obj, latest)
    return latest


def load_run_checkpoint(run_dir: str | os.PathLike,
                        explicit: str | os.PathLike | None = None) -> tuple[dict, Path] | None:
    """The checkpoint to resume from: `explicit` if given, else the run folder's latest readable one, else None.

    A damaged latest file is reported (path and reason) and the previous checkpoint is used instead. The main process
    moves the damaged file aside to `checkpoint_damaged.pt`, so that the next save does not keep it as
    `checkpoint_prev.pt` in place of the good one.
    """
    if explicit is not None:
        return load_checkpoint_file(explicit), Path(explicit)
    candidates = [p for p in (Path(run_dir) / "checkpoint.pt", Path(run_dir) / "checkpoint_prev.pt") if p.exists()]
    for i, path in enumerate(candidates):
        try:
            return load_checkpoint_file(path), path
        except CheckpointError as e:
            if i + 1 == len(candidates):
                raise
            note, damaged = "", path.with_name("checkpoint_damaged.pt")
            if is_main_process():
                os.replace(path, damaged)
                note = f" (the damaged file is kept as {damaged})"
            print(f"warning: {e}; resuming from the previous checkpoint {candidates[i + 1]} instead{note}",
                  file=sys.stderr)
    return None
