"""Plot a run folder: loss/accuracy/LR curves from log.jsonl and the multigrid schedule from schedule.json.

    python tools/plot_run.py logs/x3d_xs_demo              # writes curves.png and schedule.png into the run folder
    python tools/plot_run.py logs/x3d_xs_demo/log.jsonl    # the same

curves.png stacks three panels over epochs: training loss; top-1 (solid) and top-5 (dashed) of training, validation
and test (and mAP for multi-label runs); the learning rate. Dotted vertical lines mark where each multigrid stage
starts, labelled with its clip shape T×crop (frames × crop size) where the stage is wide enough for the label.
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
    p.add_argument("run_dir", help="Run folder holding log.jsonl (and schedule.json for the schedule plot), or the "
                                   "log.jsonl itself.")
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


# (key, colour, line style) per panel; top-5 dashed in the colour of its top-1.
_PANELS = {
    "loss": [("train_loss", "C0", "-"), ("val_loss", "C1", "-")],
    "accuracy (%)": [("train_top1", "C0", "-"), ("val_top1", "C1", "-"), ("val_top5", "C1", "--"),
                     ("test_top1", "C2", "-"), ("test_top5", "C2", "--"), ("val_map", "C3", "-"),
                     ("test_map", "C4", "-")],
    "learning rate": [("train_lr", "C0", "-")],
}


def _mark_stages(fig: plt.Figure, axes: list[plt.Axes], stages: list[dict]) -> None:
    """A dotted line at each stage start on every panel; above the top panel, the stage's T×crop where it fits."""
    for ax in axes:
        for s in stages:
            ax.axvline(s["start"], color="0.55", linestyle=":", linewidth=1, zorder=0)
    top = axes[0]
    labels = [(s, top.text(s["start"], 1.01, f" {s['frames']}×{s['crop']}", transform=top.get_xaxis_transform(),
                           ha="left", va="bottom", fontsize=8, color="0.3")) for s in stages]
    fig.tight_layout()  # room for the labels above the top panel, then measure what fits
    renderer = fig.canvas.get_renderer()
    for s, text in labels:
        (x0, _), (x1, _) = top.transData.transform([(s["start"], 0), (s["end"], 0)])
        if text.get_window_extent(renderer).width > x1 - x0:
            text.remove()  # too narrow a stage: the line alone marks it


def curves_figure(rows: list[dict], schedule: dict | None = None) -> plt.Figure:
    """Loss, top-1/top-5 and learning rate against epochs, with the multigrid stages of `schedule` marked."""
    fig, axes = plt.subplots(len(_PANELS), 1, figsize=(10, 9), sharex=True)
    for ax, (ylabel, keys) in zip(axes, _PANELS.items()):
        for key, colour, style in keys:
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=colour, linestyle=style, marker="o" if len(points) < 30 else None,
                        markersize=4, label=key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    if schedule and schedule.get("lr"):  # the LR function between the per-epoch points (warm-up, stage jumps)
        epochs, lrs = zip(*schedule["lr"])
        axes[-1].plot(epochs, lrs, color="0.6", linewidth=1, zorder=1, label="lr (schedule.json)")
        axes[-1].legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("epoch")
    stages = (schedule or {}).get("stages") or []
    if stages:
        last = max(max(s["end"] for s in stages), max((r["epoch"] for r in rows), default=0))
        axes[0].set_xlim(0, last * 1.01)  # a margin, so the final evaluation's markers show whole
        _mark_stages(fig, list(axes), stages)
    else:
        fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], out: Path, schedule: dict | None = None) -> Path:
    """curves.png in `out` (see curves_figure)."""
    fig = curves_figure(rows, schedule)
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
    given = Path(args.run_dir)
    run_dir, log = (given.parent, given) if given.is_file() else (given, given / "log.jsonl")
    out = Path(args.out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    schedule_file = run_dir / "schedule.json"
    schedule = json.loads(schedule_file.read_text()) if schedule_file.is_file() else None
    written = [plot_curves(read_log(log), out, schedule)]
    if schedule is not None:
        written.append(plot_schedule(schedule, out))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main(get_args_parser().parse_args())
