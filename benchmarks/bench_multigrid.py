"""Multigrid vs the fixed-shape recipe: the same model, data and epoch budget, side by side in one run.

    python benchmarks/bench_multigrid.py                      # demo data (generated if missing), X3D-XS, CPU
    python benchmarks/bench_multigrid.py --epochs 6 --quick   # a shorter run
    python benchmarks/bench_multigrid.py --also short long    # and each cycle alone
    python benchmarks/bench_multigrid.py --also big-batch     # and the fixed shape at multigrid's largest batch
    python benchmarks/bench_multigrid.py --also same-steps same-time   # and the fixed shape for fewer epochs
    python benchmarks/bench_multigrid.py --frames 16 --sampling-rate 4 --crop 40   # another base shape

The fixed-shape recipe trains N epochs at the base shape; multigrid derives its schedule from the same N (stretched by
the epoch factor, as the paper does). Each recipe runs as its own process through train_x3d_kinetics_multigrid.py and
is evaluated with the same multi-view test. Printed: iterations, training time (the training loop's, without
start-up, evaluation and checkpoints) and the speed-up on it, wall-clock of the whole process, test top-1/top-5, the
test top-1 of every class (which classes each recipe tells apart) and the data-wait share (time the
training loop waited for batches) per multigrid shape.

`big-batch` is a control without any change of shape: the fixed recipe with the batch and LR multiplied by 8, the
factors multigrid uses at its coarsest long-cycle shape (linear scaling). It takes 8x fewer optimizer steps for the same
epochs and tells how much of multigrid's accuracy change comes from fewer, larger steps rather than from the shapes.
`same-steps` and `same-time` are the fixed recipe again, for the whole number of epochs that comes closest to
multigrid's number of iterations or to its training time: what the fixed shape reaches with multigrid's budget.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The demo's recipe (the Makefile's DEMO_FLAGS) but the base shape: X3D-XS, demo videos 128 px on the short side
# scaled to 64-80, no flip (it would turn "moving left" into "moving right"), no dropout.
DEMO_INPUT = ["--model", "x3d_xs", "--jitter", "64", "80", "--test-crop", "64", "--flip-prob", "0", "--dropout", "0",
              "--warmup-epochs", "1"]


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/demo/kinetics", help="Kinetics-layout data (demo data by default).")
    p.add_argument("--out", default="logs/bench_multigrid", help="Folder for the runs.")
    p.add_argument("--epochs", type=int, default=30, help="Epochs of the fixed-shape recipe (N).")
    p.add_argument("--frames", type=int, default=8, help="Frames of the base shape (the demo's: 8).")
    p.add_argument("--sampling-rate", type=int, default=8, help="Frame stride of the base shape (the demo's: 8).")
    p.add_argument("--crop", type=int, default=56, help="Training crop of the base shape (the demo's: 56).")
    p.add_argument("--batch-size", type=int, default=8, help="Clips per iteration at the base shape.")
    p.add_argument("--lr", type=float, default=0.015, help="LR at the base shape (both recipes).")
    p.add_argument("--workers", type=int, default=2, help="Data-loading processes.")
    p.add_argument("--test-views", type=int, default=10, help="Temporal views of the final test (× 3 crops).")
    p.add_argument("--quick", action="store_true", help="Fewer test views, for a fast look.")
    p.add_argument("--also", nargs="*", default=[], choices=["short", "long", "big-batch", "same-steps", "same-time"],
                   help="Also run multigrid with only the short or only the long cycle, the fixed shape at an "
                        "8x batch and LR, or the fixed shape for multigrid's number of iterations or training time.")
    return p


def base_shape(args: argparse.Namespace) -> list[str]:
    """The trainer's flags for the base clip shape."""
    return ["--frames", str(args.frames), "--sampling-rate", str(args.sampling_rate), "--crop", str(args.crop)]


def run_recipe(args: argparse.Namespace, name: str, multigrid: str, batch_factor: int = 1,
               epochs: int | None = None) -> dict:
    """Train one recipe from scratch in its own process; returns its wall-clock and final log lines."""
    run_dir = Path(args.out) / re.sub(r"\W+", "_", name).strip("_")
    if run_dir.exists():
        for f in run_dir.iterdir():  # always from scratch: a leftover checkpoint would resume
            f.unlink()
    views = "2" if args.quick else str(args.test_views)
    cmd = [sys.executable, str(ROOT / "train_x3d_kinetics_multigrid.py"), "--data-root", args.data_root,
           "--output-dir", str(run_dir), *DEMO_INPUT, *base_shape(args),
           "--batch-size", str(args.batch_size * batch_factor), "--epochs", str(epochs or args.epochs),
           "--lr", str(args.lr * batch_factor), "--multigrid", multigrid,
           "--workers", str(args.workers), "--eval-every", "1000", "--precise-bn-batches", "20",
           "--test-views", views, "--no-progress"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {"name": name, "wall": wall, "epochs": [r for r in log if "train_loss" in r], "test": log[-1]}


def data_wait_by_shape(epochs: list[dict]) -> dict[str, float]:
    """Time-weighted share of the training loop spent waiting for data, per long-cycle shape."""
    waited, total = defaultdict(float), defaultdict(float)
    for r in epochs:
        waited[r["shape"]] += r["train_data_wait"] * r["train_seconds"]
        total[r["shape"]] += r["train_seconds"]
    return {shape: waited[shape] / total[shape] for shape in total if total[shape] > 0}


def main(args: argparse.Namespace) -> None:
    if not (Path(args.data_root) / "annotations").exists():
        subprocess.run([sys.executable, str(ROOT / "tools/make_demo_data.py"), "--out",
                        str(Path(args.data_root).parent), "--datasets", "kinetics"], check=True, cwd=ROOT)
    fixed, multigrid = run_recipe(args, "fixed", "none"), run_recipe(args, "multigrid", "both")
    results = [fixed, multigrid]
    results += [run_recipe(args, f"{mode} cycle only", mode) for mode in ("short", "long") if mode in args.also]
    if "big-batch" in args.also:
        results.append(run_recipe(args, "fixed, 8x batch and LR", "none", batch_factor=8))
    # Fixed-shape controls on multigrid's budget, in whole epochs of the fixed recipe (at least 2: 1 is warm-up).
    controls = defaultdict(list)  # epochs -> which controls they are (one run when both round to the same)
    for control, key in (("same-steps", "train_iters"), ("same-time", "train_seconds")):
        if control in args.also:
            per_epoch = sum(e[key] for e in fixed["epochs"]) / len(fixed["epochs"])
            controls[max(2, round(sum(e[key] for e in multigrid["epochs"]) / per_epoch))].append(control)
    for n, names in controls.items():
        results.append(run_recipe(args, f"fixed, {n} epochs ({', '.join(names)})", "none", epochs=n))
    train_time = {r["name"]: sum(e["train_seconds"] for e in r["epochs"]) for r in results}
    base = train_time["fixed"]
    print("\n| recipe | epochs | iterations | training time | speed-up | wall-clock | test top-1 | test top-5 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        iters = sum(e["train_iters"] for e in r["epochs"])
        t, seconds = r["test"], train_time[r["name"]]
        print(f"| {r['name']} | {len(r['epochs'])} | {iters} | {seconds / 60:.1f} min | {base / seconds:.2f}× | "
              f"{r['wall'] / 60:.1f} min | {t['test_top1']:.1f} | {t['test_top5']:.1f} |")
    print(f"\n({results[0]['test']['test_videos']} test videos × {results[0]['test']['test_views']} views; "
          f"{args.epochs} base epochs, batch {args.batch_size}, {' '.join(DEMO_INPUT + base_shape(args))})")
    print("\n| test top-1 per class | " + " | ".join(r["name"] for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for label in results[0]["test"]["test_class_top1"]:
        print(f"| {label} | " + " | ".join(f"{r['test']['test_class_top1'][label]:.0f}" for r in results) + " |")
    print("\n| multigrid shape (T x crop) | data-wait share |")
    print("|---|---:|")
    for shape, share in data_wait_by_shape(multigrid["epochs"]).items():
        print(f"| {shape} | {100 * share:.1f}% |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
