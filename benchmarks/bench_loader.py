"""Seconds per training iteration at each multigrid shape: the model alone, and fed by real data-loader workers.

    python benchmarks/bench_loader.py                       # make demo's shapes on its data (about 13 minutes)
    python benchmarks/bench_loader.py --shapes 8x8x56 64x2x40 --iters 40 --rows alone lowest jpeg

On a machine where the data-loader workers decode on the same cores as the training step (CPU training, or a GPU
machine with more workers than free cores), an iteration costs more than the model alone. Rows, per batch shape
(batch × frames × crop, sub-batch BN as multigrid sets it), each in its own process:
- `alone`: forward, backward and SGD step of X3D-XS on random clips already in memory;
- `default priority`: the same step on batches that --workers DataLoader workers decode from the demo videos, the
  workers at the same CPU priority as the step;
- `lowest priority`: the same, the workers at the lowest priority (what the training scripts do,
  utils.init_loader_worker);
- `JPEG frames`: lowest priority, the same videos as JPEG frame folders (`make_demo_data.py --kinetics-format jpeg`,
  made in --jpeg-root when missing), which decode without H.264's inter-frame work and at reduced size for small
  crops;
- `other` (when asked for): lowest priority, another copy of the demo set in --other-root, e.g. one made with
  `make_demo_data.py --no-fast-decode` to measure an encoding against make demo's.
The rounds alternate (alone, default, lowest, jpeg, alone, ...), so a machine that slows down affects every row
alike; the table gives each row's median over the rounds, its ratio to the model alone and the share of the step
spent waiting for a batch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"alone": "model alone", "default": "default priority", "lowest": "lowest priority", "jpeg": "JPEG frames",
         "other": "--other-root"}
# make demo's multigrid shapes (batch x frames x crop): the base shape, then the long and short cycles'.
DEMO_SHAPES = ["8x8x56", "16x4x56", "16x8x40", "32x4x40", "32x8x28", "64x2x40", "64x4x28", "128x2x28"]


def ignore_sigint(worker_id: int) -> None:
    """The workers' setup at the default priority: only Ctrl-C ignored, as utils.init_loader_worker does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def measure(mode: str, batch: int, frames: int, crop: int, args: argparse.Namespace) -> dict:
    """Mean seconds per iteration and data-wait share of one mode and shape (run in a child process)."""
    import engine
    import utils
    import x3d
    from kinetics_multigrid import build_kinetics
    from multigrid import ClipSpec, bn_splits_for

    utils.keep_freed_memory()  # as the training scripts do
    torch.manual_seed(0)
    root = {"jpeg": args.jpeg_root, "other": args.other_root}.get(mode, args.data_root)
    dataset = build_kinetics(root, "train", frames=8, sampling_rate=8, train_crop=56, train_jitter=(64, 80),
                             test_crop=64, flip_prob=0.0)
    model = x3d.to_channels_last(x3d.build_model("x3d_xs", num_classes=dataset.num_classes, dropout=0.0))
    x3d.set_bn_splits(model, bn_splits_for(batch))
    optimizer = engine.build_optimizer(model, lr=1e-4, weight_decay=5e-5)  # the training scripts' (fused) SGD
    total = args.iters + 3  # three warm-up iterations
    if mode == "alone":
        clips = torch.randn(batch, 3, frames, crop, crop)
        labels = torch.randint(0, dataset.num_classes, (batch,))
        batches = iter([(clips, labels)] * total)
    else:
        # Distinct videos and seeds per clip, the demo's sampling rate (8); the rates multigrid draws vary the span.
        specs = [[ClipSpec((i * batch + j) * 7919 % dataset.num_videos, frames, crop, 8, 8, i * batch + j)
                  for j in range(batch)] for i in range(total)]
        init = ignore_sigint if mode == "default" else utils.init_loader_worker
        batches = iter(DataLoader(dataset, batch_sampler=specs, num_workers=args.workers, worker_init_fn=init))
    model.train()
    wait = 0.0
    for i in range(total):
        if i == 3:
            start, wait = time.perf_counter(), 0.0
        before = time.perf_counter()
        clips, labels = next(batches)
        wait += time.perf_counter() - before
        loss = F.cross_entropy(model(clips.contiguous(memory_format=torch.channels_last_3d)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    return {"s_per_it": seconds / args.iters, "wait": wait / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT / "data/demo/kinetics"),
                   help="make demo's videos (made if missing).")
    p.add_argument("--jpeg-root", default=str(ROOT / "data/demo_jpeg/kinetics"),
                   help="The same videos as JPEG frame folders, for the `jpeg` row (made if missing).")
    p.add_argument("--other-root", default=None,
                   help="Another copy of the demo set for the `other` row (not made: it must exist).")
    p.add_argument("--rows", nargs="+", default=[m for m in MODES if m != "other"], choices=list(MODES),
                   help="Rows to measure; `alone` is always measured, as the reference.")
    p.add_argument("--shapes", nargs="+", default=DEMO_SHAPES, metavar="BxTxS", help="Batch shapes to measure.")
    p.add_argument("--iters", type=int, default=20, help="Timed iterations per row and round.")
    p.add_argument("--rounds", type=int, default=2, help="Rounds of alternating rows.")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers.")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # mode batch frames crop: one row, print JSON
    args = p.parse_args()
    if args.child:
        mode, b, t, s = args.child[0], *map(int, args.child[1:])
        print(json.dumps(measure(mode, b, t, s, args)))
        return
    modes = ["alone"] + [m for m in MODES if m in args.rows and m != "alone"]
    if "other" in modes and not (args.other_root and Path(args.other_root).exists()):
        p.error(f"the `other` row needs --other-root to name an existing data set (got {args.other_root})")
    for root, wanted, fmt in [(args.data_root, True, "mp4"), (args.jpeg_root, "jpeg" in modes, "jpeg")]:
        if wanted and not Path(root).exists():
            subprocess.run([sys.executable, str(ROOT / "tools/make_demo_data.py"), "--datasets", "kinetics",
                            "--kinetics-format", fmt, "--out", str(Path(root).parent)], check=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, {args.workers} "
          f"workers, {args.iters} iterations x {args.rounds} rounds per row")
    print("| batch × T × crop | model alone (s/it) | "
          + " | ".join(f"{MODES[m]} (s/it) | vs alone | data wait" for m in modes[1:]) + " |")
    print("|---|---:|" + "---:|---:|---:|" * (len(modes) - 1))
    for spec in args.shapes:
        b, t, s = map(int, spec.split("x"))
        results: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode in modes:
                cmd = [sys.executable, __file__, "--child", mode, str(b), str(t), str(s), "--data-root",
                       args.data_root, "--jpeg-root", args.jpeg_root, "--iters", str(args.iters),
                       "--workers", str(args.workers), *(["--other-root", args.other_root] if args.other_root else [])]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
                results[mode].append(json.loads(out))
        med = {m: statistics.median(r["s_per_it"] for r in rs) for m, rs in results.items()}
        wait = {m: statistics.median(r["wait"] for r in rs) for m, rs in results.items()}
        cells = [f"{med[m]:.3f} | {med[m] / med['alone']:.2f} | {wait[m]:.0%}" for m in modes[1:]]
        print(f"| {spec} | {med['alone']:.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
