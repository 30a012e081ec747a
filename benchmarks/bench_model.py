"""X3D training and inference speed on this machine: this project's x3d.py against PyTorchVideo's create_x3d.

    python benchmarks/bench_model.py                  # X3D-XS at 4x160 (its training input), the demo's 8x56 and 2x40
    python benchmarks/bench_model.py --seconds 10     # longer timing per row
    python benchmarks/bench_model.py --model x3d_m --inputs 2x16x224   # X3D-M at its training input
    python benchmarks/bench_model.py --layers         # each depthwise layer's gradients, every way, timed apart
    python benchmarks/bench_model.py --device cuda    # on the GPU, bf16 autocast as the scripts train there
    python benchmarks/bench_model.py --rows pytorchvideo_cl ours ours_compiled   # and torch.compile's training step

Rows, each at the same input and batch, with an SGD step with momentum (PyTorch's default loop over the parameters
for PyTorchVideo's rows, the training scripts' fused step, `engine.build_optimizer`, for x3d.py's):
- PyTorchVideo 0.1.5 `create_x3d` (the reference), in the default layout and in channels_last_3d, as its users run
  it, and in channels_last_3d with freed memory kept for reuse (utils.keep_freed_memory, which this project's scripts
  call) to show what that setting alone gives;
- x3d.py in channels_last_3d (what the training scripts use) with each depthwise backward of depthwise_conv.py
  forced (`aten`: ATen's; `own`: the project's; `own-input`: the project's input gradient, ATen's weight gradient),
  and as it trains (`auto`: the fastest per layer and shape, timed at the first step, which is a warm-up step here),
  all with freed memory kept, as the scripts run; as it trains with glibc's default malloc settings; and as it trains
  on a machine without a C compiler (PyTorch and ATen instead of depthwise_conv.c and batch_norm.c); and as it
  trains with ATen's batch norm instead of batch_norm.c; and through torch.compile (`ours_compiled`: inductor, static
  shapes: the model for training, as `--compile` trains it, and the folded model for inference; opt-in on the CPU,
  where each input compiles for minutes).
Each row runs in its own process, so its peak memory is its own: resident (ru_maxrss) on the CPU, allocated by
PyTorch on CUDA. Printed: training clips/s (forward, backward, optimizer step; timed after two warm-up steps) and the
GFLOP/s they amount to (3x the forward's FLOPs per clip), the seconds of the first training step (where cuDNN's
autotuning and torch.compile's compilation happen), inference clips/s (eval mode, no grad) as the model stands and,
for x3d.py, as the evaluation runs it (x3d.fold_batchnorm: BatchNorm folded into the convolutions, the activations
fused into them; inference mode), and the peak memory.
The header names the device (the CPU with its vector extensions and cores, or the GPU) and the GFLOP/s of a large
matmul there in the precision the rows compute in: the machine's practical peak.

On CUDA the steps run under `--amp`'s autocast (bf16 by default, as the training scripts run there; fp16 with a
gradient scaler) for every row alike, and the default rows are the two PyTorchVideo layouts, x3d.py as trained and
compiled: the C kernels and glibc's malloc are the CPU's.

`--layers` times instead, in this process, the gradients of each distinct depthwise layer of the model at each input
(input shape, kernel, stride) every way depthwise_conv.py can compute them: ATen's input and weight gradients, each
asked for alone, the own input gradient, and the own weight gradient in depthwise_conv.c and by taps in PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {
    "pytorchvideo": "PyTorchVideo create_x3d",
    "pytorchvideo_cl": "PyTorchVideo create_x3d, channels_last_3d",
    "pytorchvideo_cl_kept": "PyTorchVideo create_x3d, channels_last_3d, freed memory kept",
    "ours_malloc_default": "x3d.py as trained, glibc's default malloc",
    "ours_no_c": "x3d.py as trained, without the C kernels (no C compiler)",
    "ours_aten_bn": "x3d.py as trained, ATen's batch norm",
    "ours_aten": "x3d.py, ATen depthwise backward",
    "ours_own": "x3d.py, own depthwise backward",
    "ours_own_input": "x3d.py, own input gradient, ATen weight gradient",
    "ours": "x3d.py as trained (fastest backward per layer and shape)",
    "ours_compiled": "x3d.py, torch.compile (inductor, static shapes)",
}
CUDA_ROWS = ["pytorchvideo", "pytorchvideo_cl", "ours", "ours_compiled"]
CPU = torch.device("cpu")
# Rows that run as PyTorchVideo's users do, with glibc's default malloc; the others keep freed memory for reuse as
# this project's scripts do (utils.keep_freed_memory).
DEFAULT_MALLOC = ("pytorchvideo", "pytorchvideo_cl", "ours_malloc_default")
# PyTorchVideo's create_x3d arguments of each variant (its defaults are X3D-XS's; S is XS's network at 13 frames).
PTV_VARIANTS = {"x3d_xs": {}, "x3d_s": {}, "x3d_m": {}, "x3d_l": {"depth_factor": 5.0}}


def build(row: str, name: str, frames: int, crop: int, num_classes: int) -> nn.Module:
    """The row's X3D variant, randomly initialised."""
    if row.startswith("pytorchvideo"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pytorchvideo.models.x3d import create_x3d
        model = create_x3d(input_clip_length=frames, input_crop_size=crop, model_num_class=num_classes,
                           head_activation=None, dropout_rate=0.0, **PTV_VARIANTS[name])
        return model if row == "pytorchvideo" else model.to(memory_format=torch.channels_last_3d)
    import batch_norm
    import native
    import x3d

    native.enabled = row != "ours_no_c"
    if row == "ours_aten_bn":  # this process only: batch norm in ATen's kernels, the depthwise gradients still in C
        batch_norm.in_c = lambda *tensors: False
    # This process only: which depthwise backward (depthwise_conv.py); "ours" times them per layer and shape.
    # ATen's in a compiled graph, as engine.compile_for's.
    os.environ["X3D_DEPTHWISE_BACKWARD"] = {"ours_aten": "aten", "ours_own": "own", "ours_own_input": "own-input",
                                            "ours_compiled": "aten"}.get(row, "auto")
    return x3d.to_channels_last(x3d.build_model(name, num_classes=num_classes, dropout=0.0))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU has nothing queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, seconds: float, device: torch.device = CPU) -> float:
    """Seconds per call of step(), after two warm-up calls."""
    step()
    step()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        step()
        calls += 1
        synchronize(device)
    return (time.perf_counter() - start) / calls


def measure(row: str, name: str, batch: int, frames: int, crop: int, seconds: float, device: torch.device,
            amp: str) -> dict:
    """Training and inference clips/s of one row at one input (run in a child process)."""
    if row not in DEFAULT_MALLOC and device.type == "cpu":
        import utils

        utils.keep_freed_memory()
    torch.backends.cudnn.benchmark = True  # as engine.start sets it
    torch.manual_seed(0)
    model = build(row, name, frames, crop, num_classes=400).to(device)
    layout = torch.channels_last_3d if row != "pytorchvideo" else torch.contiguous_format
    clips = torch.randn(batch, 3, frames, crop, crop, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 400, (batch,), device=device)
    if row.startswith("pytorchvideo"):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # as its users would write it
    else:
        import engine

        optimizer = engine.build_optimizer(model, lr=0.01, weight_decay=5e-5)  # the training scripts' (fused) SGD
    autocast = torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16,
                              enabled=device.type == "cuda" and amp != "none")
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp == "fp16")
    compiled = row == "ours_compiled"
    net = torch.compile(model, dynamic=False) if compiled else model

    def train_step() -> None:
        with autocast:
            loss = F.cross_entropy(net(clips), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    model.train()
    start = time.perf_counter()
    train_step()  # cuDNN's autotuning, torch.compile's compiling
    synchronize(device)
    out = {"first_step": time.perf_counter() - start}
    out["train"] = batch / timed(train_step, seconds, device)
    model.eval()
    with torch.no_grad(), autocast:
        out["infer"] = batch / timed(lambda: model(clips), seconds, device)
    if not row.startswith("pytorchvideo"):
        import x3d

        folded = x3d.fold_batchnorm(model)
        folded = torch.compile(folded, dynamic=False) if compiled else folded
        with torch.inference_mode(), autocast:
            out["infer_folded"] = batch / timed(lambda: folded(clips), seconds, device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**out, "peak_mib": peak / 2**20}


def layer_table(name: str, inputs: list[str]) -> None:
    """Milliseconds of each distinct depthwise layer's gradients, every way (module docstring)."""
    import depthwise_conv
    import utils
    import x3d

    utils.keep_freed_memory()
    model = x3d.to_channels_last(x3d.build_model(name, num_classes=400))
    layers = {}  # (input shape, kernel, stride, padding) -> weight

    def record(module: nn.Module, args: tuple) -> None:
        layers.setdefault((tuple(args[0].shape), module.kernel_size, module.stride, module.padding),
                          module.weight.detach())

    for module in model.modules():
        if isinstance(module, depthwise_conv.DepthwiseConv3d):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        for spec in inputs:
            b, t, s = map(int, spec.split("x"))
            model(torch.randn(b, 3, t, s, s).contiguous(memory_format=torch.channels_last_3d))
    print("| layer input (N, C, T, H, W), kernel, stride | ATen input grad | own input grad | ATen weight grad | "
          "own weight grad, C | own weight grad, PyTorch taps |")
    print("|---|---:|---:|---:|---:|---:|")
    for (shape, kernel, stride, padding), weight in layers.items():
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last_3d)
        out = F.conv3d(x, weight, None, stride, padding, 1, shape[1])
        grad = torch.randn(out.shape).contiguous(memory_format=torch.channels_last_3d)
        args = (grad, weight, x, stride, padding)
        ways = [partial(depthwise_conv.aten_grads, *args, [True, False, False]),
                partial(depthwise_conv.own_input_grad, *args),
                partial(depthwise_conv.aten_grads, *args, [False, True, False]),
                partial(depthwise_conv.own_weight_grad, *args),
                partial(depthwise_conv.weight_grad_by_taps, x, grad, weight.shape, stride, padding)]
        cells = [f"{1e3 * timed(way, 1.0):.2f}" if way() is not None else "–" for way in ways]
        print(f"| {', '.join(map(str, shape))}, {'×'.join(map(str, kernel))}, {'×'.join(map(str, stride))} | "
              f"{' | '.join(cells)} |", flush=True)


def forward_gflops(name: str, frames: int, crop: int) -> float:
    """GFLOPs (2 per multiply-add) of one clip's forward pass."""
    import x3d

    model = x3d.build_model(name, num_classes=400).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, frames, crop, crop))
    return counter.get_total_flops() / 1e9


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 2.0) -> float:
    """GFLOP/s of a large matmul on the device (on the CPU with torch's threads): its practical peak."""
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / timed(lambda: a @ b, seconds, device) / 1e9


def cpu_name() -> str:
    """The CPU's model name and its widest vector extensions, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vector = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f in flags]
    return f"{model} ({', '.join(vector) or 'no AVX2'}), {os.cpu_count()} cores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="x3d_xs", choices=sorted(PTV_VARIANTS), help="X3D variant.")
    p.add_argument("--inputs", nargs="+", default=["8x4x160", "8x8x56", "64x2x40"], metavar="BxTxS",
                   help="Batch x frames x crop of each input (default: X3D-XS's training input, the demo's, and the "
                        "demo's coarsest multigrid shape).")
    p.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                   help="Which rows to run (default: all but ours_compiled on the CPU; on CUDA " + ", ".join(CUDA_ROWS)
                        + ").")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="Where the models run (default: CUDA where there is a GPU).")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"],
                   help="Autocast on CUDA, for every row (default: bf16, as the scripts train there); the CPU always "
                        "computes in float32.")
    p.add_argument("--seconds", type=float, default=4.0, help="Timing length per row, mode and round.")
    p.add_argument("--rounds", type=int, default=2,
                   help="Rounds over the rows (alternating, so that a machine that slows down affects every row "
                        "alike); each figure is the median over the rounds.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    p.add_argument("--layers", action="store_true",
                   help="Time each depthwise layer's gradients every way instead (module docstring).")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # row model batch frames crop: one row, print JSON
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.layers and device.type == "cuda":
        p.error("--layers times the CPU's depthwise kernels; leave out --device cuda")
    rows = args.rows or (CUDA_ROWS if device.type == "cuda" else [row for row in ROWS if row != "ours_compiled"])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        row, name, b, t, s = args.child[0], args.child[1], *map(int, args.child[2:])
        print(json.dumps(measure(row, name, b, t, s, args.seconds, device, args.amp)))
        return

    if device.type == "cuda":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}[args.amp]
        print(f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores; torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}, autocast {args.amp}; {str(dtype).removeprefix('torch.')} matmul "
              f"{matmul_gflops(device, dtype):.0f} GFLOP/s")
    else:
        print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}; fp32 matmul {matmul_gflops(device):.0f} GFLOP/s")
    if args.layers:
        layer_table(args.model, args.inputs)
        return
    print("| model | input (batch × T × crop) | train clips/s | train GFLOP/s | first step | inference clips/s | "
          "inference, BN folded | peak memory |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.inputs:
        b, t, s = map(int, spec.split("x"))
        flops = 3 * forward_gflops(args.model, t, s)  # forward + backward ≈ 3 forwards
        runs: dict[str, list[dict]] = {row: [] for row in rows}
        for _ in range(args.rounds):
            for row in rows:
                cmd = [sys.executable, __file__, "--child", row, args.model, str(b), str(t), str(s),
                       "--seconds", str(args.seconds), "--device", args.device, "--amp", args.amp]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
                runs[row].append(json.loads(out))
        base = None
        for row, outs in runs.items():
            out = {key: statistics.median(o[key] for o in outs) for key in outs[0]}
            base = base or out["train"]
            folded = f"{out['infer_folded']:.1f}" if "infer_folded" in out else "–"
            print(f"| {ROWS[row]} | {b} × {t} × {s}² | {out['train']:.2f} ({out['train'] / base:.2f}×) | "
                  f"{out['train'] * flops:.0f} | {out['first_step']:.2f} s | {out['infer']:.1f} | {folded} | "
                  f"{out['peak_mib']:.0f} MiB |", flush=True)

if __name__ == "__main__":
    main()
