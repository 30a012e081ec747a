"""Multigrid vs the fixed-shape recipe: the same model, data and base recipe, side by side in one run.

    python benchmarks/bench_multigrid.py                      # demo data (generated if missing), X3D-XS, CPU
    python benchmarks/bench_multigrid.py --seeds 2            # both recipes twice, and the mean
    python benchmarks/bench_multigrid.py --also short long    # and each cycle alone
    python benchmarks/bench_multigrid.py --also one-frame     # and the fixed shape on single frames
    python benchmarks/bench_multigrid.py --also big-batch     # and the fixed shape at multigrid's largest batch
    python benchmarks/bench_multigrid.py --also same-steps same-time   # and the fixed shape for fewer epochs
    python benchmarks/bench_multigrid.py --frames 16 --sampling-rate 4 --crop 40   # another base shape

The fixed-shape recipe trains --epochs epochs at the base shape; multigrid derives its schedule from --mg-epochs
base epochs (default: the same), stretched by the epoch factor as the paper does. Each recipe runs as its own process
through train_x3d_kinetics_multigrid.py, is evaluated after every epoch on the validation set (one centre clip per
video, after precise BN at the base shape; not counted as training time) and ends with the same multi-view test.

Printed: per run the epochs, iterations, training time (the training loop's, without start-up, evaluation and
checkpoints) and its speed-up, wall-clock, the final validation and test top-1, and when the run and the fixed recipe
first reached the validation top-1 both end with (the speed-up at equal accuracy); the mean over seeds;
the test top-1 of every class; and, for multigrid's shapes, the seconds per iteration of the model alone (forward,
backward, SGD step on random clips, measured here after the runs) beside the same in training (loader included),
with the data-wait share. `<out>/curves.png` draws validation top-1 against training minutes for every run, as the
Multigrid paper's first figure does.

`one-frame` is the fixed recipe on 1-frame clips: what a model that sees no motion reaches. `big-batch` is a control
without any change of shape: the fixed recipe with the batch and LR multiplied by 8, the
factors multigrid uses at its coarsest long-cycle shape (linear scaling). `same-steps` and `same-time` are the fixed
recipe again, for the whole number of epochs that comes closest to multigrid's number of iterations or to its
training time: what the fixed shape reaches with multigrid's budget.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import matplotlib
import torch
from torch.utils.flop_counter import FlopCounterMode

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine import build_optimizer  # noqa: E402
from utils import keep_freed_memory  # noqa: E402
from x3d import build_model, set_bn_splits  # noqa: E402

# The demo's recipe (the Makefile's DEMO_FLAGS) but the base shape: X3D-XS, demo videos 96 px on the short side
# scaled to 64-80, no flip (it would turn "moving left" into "moving right"), no dropout.
DEMO_INPUT = ["--model", "x3d_xs", "--jitter", "64", "80", "--test-crop", "64", "--flip-prob", "0", "--dropout", "0",
              "--warmup-epochs", "1"]


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/demo/kinetics", help="Kinetics-layout data (demo data by default).")
    p.add_argument("--out", default="logs/bench_multigrid", help="Folder for the runs and curves.png.")
    p.add_argument("--epochs", type=int, default=12, help="Epochs of the fixed-shape recipe.")
    p.add_argument("--mg-epochs", type=int, default=None,
                   help="Base epochs multigrid's schedule is derived from (default: --epochs).")
    p.add_argument("--seeds", type=int, default=1, help="Run every recipe with seeds 0..N-1.")
    p.add_argument("--frames", type=int, default=8, help="Frames of the base shape (the demo's: 8).")
    p.add_argument("--sampling-rate", type=int, default=8, help="Frame stride of the base shape (the demo's: 8).")
    p.add_argument("--crop", type=int, default=56, help="Training crop of the base shape (the demo's: 56).")
    p.add_argument("--batch-size", type=int, default=8, help="Clips per iteration at the base shape.")
    p.add_argument("--lr", type=float, default=0.015, help="LR at the base shape (both recipes).")
    p.add_argument("--workers", type=int, default=2, help="Data-loading processes.")
    p.add_argument("--test-views", type=int, default=1, help="Temporal views of the final test (× 3 crops).")
    p.add_argument("--also", nargs="*", default=[],
                   choices=["short", "long", "one-frame", "big-batch", "same-steps", "same-time"],
                   help="Also run multigrid with only the short or only the long cycle, the fixed shape on single "
                        "frames (what appearance alone gives), the fixed shape at an 8x batch and LR, or the fixed "
                        "shape for multigrid's number of iterations or training time.")
    return p


def base_shape(args: argparse.Namespace, frames: int | None = None) -> list[str]:
    """The trainer's flags for the base clip shape."""
    return ["--frames", str(frames or args.frames), "--sampling-rate", str(args.sampling_rate),
            "--crop", str(args.crop)]


def run_recipe(args: argparse.Namespace, name: str, multigrid: str, seed: int, epochs: int,
               batch_factor: int = 1, frames: int | None = None) -> dict:
    """Train one recipe from scratch in its own process; returns its wall-clock and log lines."""
    run_dir = Path(args.out) / re.sub(r"\W+", "_", f"{name} seed {seed}").strip("_")
    if run_dir.exists():
        for f in run_dir.iterdir():  # always from scratch: a leftover checkpoint would resume
            f.unlink()
    cmd = [sys.executable, str(ROOT / "train_x3d_kinetics_multigrid.py"), "--data-root", args.data_root,
           "--output-dir", str(run_dir), *DEMO_INPUT, *base_shape(args, frames),
           "--batch-size", str(args.batch_size * batch_factor), "--epochs", str(epochs),
           "--lr", str(args.lr * batch_factor), "--multigrid", multigrid, "--seed", str(seed),
           "--workers", str(args.workers), "--eval-every", "1", "--precise-bn-batches", "10",
           "--test-views", str(args.test_views), "--no-progress"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    epochs_ = [r for r in log if "train_loss" in r]
    minutes = [sum(e["train_seconds"] for e in epochs_[:i + 1]) / 60 for i in range(len(epochs_))]
    return {"name": name, "seed": seed, "wall": wall, "epochs": epochs_, "test": log[-1],
            "curve": [(m, e["val_top1"]) for m, e in zip(minutes, epochs_) if "val_top1" in e],
            "minutes": minutes[-1], "iters": sum(e["train_iters"] for e in epochs_)}


def time_to_reach(curve: list[tuple[float, float]], top1: float) -> float | None:
    """Training minutes at which a validation curve first reaches top1 (None: never)."""
    return next((m for m, acc in curve if acc >= top1), None)


def shape_costs(run: dict, repeats: int = 5) -> list[dict]:
    """Seconds per iteration of every batch shape a run trained, in training (from its log) and of the model alone."""
    trained, splits = defaultdict(lambda: [0.0, 0, 0.0]), {}
    for e in run["epochs"]:
        for key, s in e.get("train_shapes", {}).items():
            trained[key][0] += s["seconds"]
            trained[key][1] += s["iters"]
            trained[key][2] += s["wait"]
            splits.setdefault(key, e["bn_splits"])
    model = build_model("x3d_xs", num_classes=len(run["test"]["test_class_top1"]), dropout=0.0)
    model.to(memory_format=torch.channels_last_3d).train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=5e-5)  # the training scripts' (fused) SGD
    rows = []
    for key in sorted(trained, key=lambda k: [int(v) for v in k.split("x")]):
        n, t, s = (int(v) for v in key.split("x"))
        set_bn_splits(model, splits[key])
        clips = torch.randn(n, 3, t, s, s).contiguous(memory_format=torch.channels_last_3d)
        labels = torch.randint(0, model.head.classifier.out_features, (n,))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(clips)  # the network's own cost: at equal voxels, stride 32 leaves small crops' late stages larger
        times = []
        for i in range(repeats + 2):  # two warm-up iterations
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(clips), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= 2:
                times.append(time.perf_counter() - start)
        seconds, iters, wait = trained[key]
        rows.append({"shape": key, "voxels": n * t * s * s, "flops": counter.get_total_flops(),
                     "alone": statistics.median(times),
                     "trained": seconds / iters, "wait": wait / seconds, "iters": iters})
    return rows


def plot_curves(results: list[dict], path: Path) -> None:
    """Validation top-1 against training minutes, one line per run (the Multigrid paper's Figure 1)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for r in results:
        colour = colours.setdefault(r["name"], f"C{len(colours)}")
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", markersize=3, color=colour, alpha=1.0 if r["seed"] == 0 else 0.55,
                label=r["name"] if r["seed"] == 0 else None)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("validation top-1 (%, one centre clip)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    if not (Path(args.data_root) / "annotations").exists():
        subprocess.run([sys.executable, str(ROOT / "tools/make_demo_data.py"), "--out",
                        str(Path(args.data_root).parent), "--datasets", "kinetics"], check=True, cwd=ROOT)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    mg_epochs = args.mg_epochs or args.epochs
    results = []
    for seed in range(args.seeds):
        fixed = run_recipe(args, "fixed", "none", seed, args.epochs)
        multigrid = run_recipe(args, "multigrid", "both", seed, mg_epochs)
        results += [fixed, multigrid]
        results += [run_recipe(args, f"{mode} cycle only", mode, seed, mg_epochs)
                    for mode in ("short", "long") if mode in args.also]
        if "one-frame" in args.also:
            results.append(run_recipe(args, "fixed, 1 frame", "none", seed, args.epochs, frames=1))
        if "big-batch" in args.also:
            results.append(run_recipe(args, "fixed, 8x batch and LR", "none", seed, args.epochs, batch_factor=8))
        # Fixed-shape controls on multigrid's budget, in whole epochs of the fixed recipe (at least 2: 1 is warm-up).
        controls = defaultdict(list)  # epochs -> which controls they are (one run when both round to the same)
        for control, key in (("same-steps", "iters"), ("same-time", "minutes")):
            if control in args.also:
                controls[max(2, round(multigrid[key] / (fixed[key] / args.epochs)))].append(control)
        for n, names in controls.items():
            results.append(run_recipe(args, f"fixed, {n} epochs ({', '.join(names)})", "none", seed, n))
    plot_curves(results, Path(args.out) / "curves.png")

    fixed_runs = {r["seed"]: r for r in results if r["name"] == "fixed"}
    print("\n| recipe | seed | epochs | iterations | training time | speed-up | wall-clock | final val top-1 "
          "| time to the common accuracy (this run / fixed) | speed-up at equal accuracy | test top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = defaultdict(list)
    for r in results:
        base = fixed_runs[r["seed"]]
        val = r["curve"][-1][1]
        # the accuracy both runs end with (the lower final one), and when each first reached it
        common = min(val, base["curve"][-1][1])
        mine, theirs = time_to_reach(r["curve"], common), time_to_reach(base["curve"], common)
        row = {"iters": r["iters"], "minutes": r["minutes"], "speed": base["minutes"] / r["minutes"],
               "wall": r["wall"] / 60, "val": val, "test": r["test"]["test_top1"]}
        rows[r["name"]].append(row)
        print(f"| {r['name']} | {r['seed']} | {len(r['epochs'])} | {r['iters']} | {r['minutes']:.1f} min | "
              f"{row['speed']:.2f}× | {row['wall']:.1f} min | {val:.1f} | "
              + ("– | – | " if r is base else f"{mine:.1f} / {theirs:.1f} min ({common:.1f} %) | "
                                               f"{theirs / mine:.2f}× | ")
              + f"{row['test']:.1f} |")
    if args.seeds > 1:
        for name, runs in rows.items():
            mean = {k: statistics.mean(run[k] for run in runs) for k in runs[0]}
            print(f"| {name} | mean | – | {mean['iters']:.0f} | {mean['minutes']:.1f} min | {mean['speed']:.2f}× | "
                  f"{mean['wall']:.1f} min | {mean['val']:.1f} | – | – | {mean['test']:.1f} |")
    test = results[0]["test"]
    print(f"\n({test['test_videos']} test videos × {test['test_views']} views; {args.epochs} base epochs for the "
          f"fixed recipe, {mg_epochs} for multigrid; batch {args.batch_size}, "
          f"{' '.join(DEMO_INPUT + base_shape(args))}; curves in {Path(args.out) / 'curves.png'})")
    seed0 = [r for r in results if r["seed"] == 0]
    print("\n| test top-1 per class (seed 0) | " + " | ".join(r["name"] for r in seed0) + " |")
    print("|---|" + "---:|" * len(seed0))
    for label in test["test_class_top1"]:
        print(f"| {label} | " + " | ".join(f"{r['test']['test_class_top1'][label]:.0f}" for r in seed0) + " |")

    multigrid = next(r for r in results if r["name"] == "multigrid")
    costs = shape_costs(multigrid)
    base = next(c for c in costs if c["shape"] == f"{args.batch_size}x{args.frames}x{args.crop}")
    print("\n| multigrid shape (batch × T × crop) | voxels vs base | FLOPs vs base | iterations | model alone (s/it) "
          "| vs base shape | in training (s/it) | training / alone | data wait |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in costs:
        print(f"| {c['shape']} | {c['voxels'] / base['voxels']:.2f} | {c['flops'] / base['flops']:.2f} | "
              f"{c['iters']} | {c['alone']:.3f} | {c['alone'] / base['alone']:.2f} | {c['trained']:.3f} | "
              f"{c['trained'] / c['alone']:.2f} | {100 * c['wait']:.1f}% |")
    ideal = sum(c["iters"] * base["trained"] for c in costs) / 60
    print(f"\nMultigrid's {multigrid['iters']} iterations would take {ideal:.1f} min at the base shape's in-training "
          f"cost; they took {multigrid['minutes']:.1f} min. Its speed-up is "
          f"{fixed_runs[0]['minutes'] / multigrid['minutes']:.2f}× against an iteration ratio of "
          f"{fixed_runs[0]['iters'] / multigrid['iters']:.2f}× "
          f"({fixed_runs[0]['minutes'] / multigrid['minutes'] / (fixed_runs[0]['iters'] / multigrid['iters']):.2f} "
          f"of it).")


if __name__ == "__main__":
    keep_freed_memory()  # the model-alone timings allocate as the training runs do
    main(get_args_parser().parse_args())
