"""Plot a run folder: loss/accuracy curves from log.jsonl and the multigrid schedule from schedule.json.

    python tools/plot_run.py logs/x3d_xs_demo        # writes curves.png and schedule.png into the run folder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="Run folder holding log.jsonl (and schedule.json for the schedule plot).")
    p.add_argument("--out-dir", default=None, help="Where to write the PNGs (default: the run folder).")
    return p


def read_log(path: Path) -> list[dict]:
    """The JSON lines of a run's log.jsonl; a clear error if it is missing or a line is malformed."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such log file (is this a run folder?)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON line ({e})") from e
    return rows


def plot_curves(rows: list[dict], out: Path) -> Path:
    """Training loss, and train/val/test top-1 against epochs."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys in ((ax_loss, ["train_loss"]), (ax_acc, ["train_top1", "val_top1", "test_top1"])):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, label=key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_ylabel("loss")
    ax_acc.set_ylabel("top-1 (%)")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_schedule(schedule: dict, out: Path) -> Path:
    """Frames, crop, per-device batch and LR of every epoch of the multigrid schedule."""
    stages = schedule["stages"]
    fig, axes = plt.subplots(4, 1, figsize=(9, 8), sharex=True)
    for ax, key, label in zip(axes[:3], ("frames", "crop", "batch_size"), ("frames T", "crop (px)", "batch/device")):
        for s in stages:
            ax.hlines(s[key], s["start"], s["end"], linewidth=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    epochs, lrs = zip(*schedule["lr"])
    axes[3].plot(epochs, lrs)
    axes[3].set_ylabel("learning rate")
    axes[3].set_xlabel("epoch")
    axes[3].grid(alpha=0.3)
    fig.suptitle("Multigrid schedule (long cycle; the short cycle varies crop and batch within each epoch)")
    fig.tight_layout()
    path = out / "schedule.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> list[Path]:
    run_dir = Path(args.run_dir)
    out = Path(args.out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(read_log(run_dir / "log.jsonl"), out)]
    if (run_dir / "schedule.json").is_file():
        written.append(plot_schedule(json.loads((run_dir / "schedule.json").read_text()), out))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main(get_args_parser().parse_args())
