"""X3D training and inference speed on this machine: this project's x3d.py against PyTorchVideo's create_x3d.

    python benchmarks/bench_model.py                  # X3D-XS at 4x160 (its training input), the demo's 8x56 and 2x40
    python benchmarks/bench_model.py --seconds 10     # longer timing per row

Rows, each at the same input and batch, with the same SGD step:
- PyTorchVideo 0.1.5 `create_x3d` (the reference), in the default layout and in channels_last_3d;
- x3d.py in channels_last_3d (what the training scripts use) with ATen's own depthwise backward;
- x3d.py as it trains, with the depthwise backward of depthwise_conv.DepthwiseConv3d.
Each row runs in its own process, so its peak resident memory (ru_maxrss) is its own. Printed: training clips/s
(forward, backward, optimizer step), inference clips/s (no grad, eval mode) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {
    "pytorchvideo": "PyTorchVideo create_x3d",
    "pytorchvideo_cl": "PyTorchVideo create_x3d, channels_last_3d",
    "ours_aten": "x3d.py, channels_last_3d, ATen depthwise backward",
    "ours": "x3d.py, channels_last_3d (as trained)",
}


def build(row: str, frames: int, crop: int, num_classes: int) -> nn.Module:
    """The row's X3D-XS, randomly initialised."""
    if row.startswith("pytorchvideo"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pytorchvideo.models.x3d import create_x3d
        model = create_x3d(input_clip_length=frames, input_crop_size=crop, model_num_class=num_classes,
                           head_activation=None, dropout_rate=0.0)
        return model.to(memory_format=torch.channels_last_3d) if row == "pytorchvideo_cl" else model
    import x3d

    if row == "ours_aten":
        os.environ["X3D_DEPTHWISE_BACKWARD"] = "aten"  # this process only: ATen's conv3d backward
    return x3d.build_model("x3d_xs", num_classes=num_classes, dropout=0.0).to(memory_format=torch.channels_last_3d)


def timed(step, seconds: float) -> float:
    """Seconds per call of step(), after two warm-up calls."""
    step()
    step()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        step()
        calls += 1
    return (time.perf_counter() - start) / calls


def measure(row: str, batch: int, frames: int, crop: int, seconds: float) -> dict:
    """Training and inference clips/s of one row at one input (run in a child process)."""
    torch.manual_seed(0)
    model = build(row, frames, crop, num_classes=400)
    layout = torch.channels_last_3d if row != "pytorchvideo" else torch.contiguous_format
    clips = torch.randn(batch, 3, frames, crop, crop).contiguous(memory_format=layout)
    labels = torch.randint(0, 400, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        loss = F.cross_entropy(model(clips), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    train = timed(train_step, seconds)
    model.eval()
    with torch.no_grad():
        infer = timed(lambda: model(clips), seconds)
    return {"train": batch / train, "infer": batch / infer,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", default=["8x4x160", "8x8x56", "64x2x40"], metavar="BxTxS",
                   help="Batch x frames x crop of each input (default: X3D-XS's training input, the demo's, and the "
                        "demo's coarsest multigrid shape).")
    p.add_argument("--seconds", type=float, default=5.0, help="Timing length per row and mode.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # row batch frames crop: measure one row, print JSON
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        row, b, t, s = args.child[0], *map(int, args.child[1:])
        print(json.dumps(measure(row, b, t, s, args.seconds)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| model | input (batch x T x crop) | train clips/s | inference clips/s | peak memory |")
    print("|---|---|---:|---:|---:|")
    for spec in args.inputs:
        b, t, s = map(int, spec.split("x"))
        base = None
        for row, title in ROWS.items():
            cmd = [sys.executable, __file__, "--child", row, str(b), str(t), str(s), "--seconds", str(args.seconds)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            base = base or out["train"]
            print(f"| {title} | {b} x {t} x {s}² | {out['train']:.2f} ({out['train'] / base:.2f}×) | "
                  f"{out['infer']:.1f} | {out['peak_mib']:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
