"""Shared plumbing for the recipes: checkpoint files, distributed set-up, seeding, logging, the shared flags.

Only the recipes' wiring reads `args` (the launch, the flag groups and their checks here, the run in engine.py);
the other functions take explicit values.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import pickletools
import platform
import random
import shlex
import shutil
import signal
import sys
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------------------------
# Errors the user can fix: reported as one `error: ...` line, without a traceback
# ----------------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A wrong flag, a missing file or bad data: the message says what is wrong and how to fix it."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint (see StopRequest); the message says where."""


def run_cli(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Run a script's `main(args)`: 0 on success, 2 with `error: ...` for a UserError, 130 on Ctrl-C."""
    try:
        main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if is_main_process():
            print(f"{e}. Resume with the same command:\n  {command_line()}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------------------------------
class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot or must not be loaded; the message names the file and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A file whose unpickling would import and call code: refused, never loaded."""


# What a weights-only checkpoint may name when unpickled: torch's tensor rebuilders and storages, OrderedDict (state
# dicts) and the bytes decoder of protocol-2 pickles. Anything else is a call the file would make on load.
_PLAIN_GLOBALS = {("collections", "OrderedDict"), ("_codecs", "encode"), ("builtins", "set"),
                  ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "slice"), ("builtins", "complex")}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_KEEPS_PAIR = {"BINGET", "LONG_BINGET", "GET", "BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE", "FRAME"}


def _pickle_globals(data: bytes) -> list[str]:
    """`module.name` of every global the pickles in `data` would import, found by parsing only (nothing is run).

    Reads consecutive pickles (the legacy torch format writes five, then raw storage bytes) until one fails to
    parse. STACK_GLOBAL takes its module and name from the two strings before it, pushed directly or from the memo.
    """
    found, stream = [], io.BytesIO(data)
    for _ in range(5):
        memo, strings = {}, []
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in _STRING_OPS:
                    strings.append(arg)
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(arg))
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = strings[-1] if strings else None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if op.name not in _STRING_OPS and op.name not in _KEEPS_PAIR:
                    strings.append(None)  # any other opcode breaks a module/name pair
        except Exception:  # not (or no longer) a pickle: the storage bytes of a legacy file, or a damaged file
            break
        if stream.tell() >= len(data):
            break
    return found


def code_in_checkpoint(path: str | os.PathLike) -> list[str]:
    """Globals a checkpoint file would import and call on a full unpickle, other than torch's and plain containers."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".pkl"))
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    unsafe = []
    for name in _pickle_globals(data):
        module, _, attr = name.rpartition(".")
        if not (module == "torch" or module.startswith("torch.") or (module, attr) in _PLAIN_GLOBALS):
            unsafe.append(name)
    return list(dict.fromkeys(unsafe))


def _reason(error: Exception) -> str:
    """The informative line of torch.load's (often long) error message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                             "Please file an issue"))]
    return f"{type(error).__name__}: {(useful or lines or [''])[0][:200]}"


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Load a checkpoint with `weights_only=True`: plain tensors and containers only, never arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file (models/README.md says where to get the released "
                              "weights and how to convert them)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, refused globals, I/O errors: torch raises many types here
        # Which one it was is decided from the file itself, not from torch's message (whose wording changes): a
        # pickle that names a function or class to call is one whose loading would run code.
        calls = code_in_checkpoint(path)
        if calls:
            raise UnsafeCheckpointError(
                f"{path}: refused: unpickling it would execute code (it imports and calls {', '.join(calls[:5])}), "
                "so it was not loaded. If it comes from a trusted source, re-save it there as a dict of tensors and "
                "plain data.") from e
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {_reason(e)}") from e
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
    processes. Under torchrun (RANK set) or with a single device, `main` runs in this process. Exits with 2 and an
    `error: ...` line on a UserError (a wrong flag, a missing file), with 130 on Ctrl-C.
    """
    if args.gpu is not None and args.device != "cpu":
        # Must happen before CUDA is initialised anywhere in this process (and is inherited by the workers).
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    nproc = len(args.gpu.split(",")) if args.gpu else args.nproc
    if nproc <= 1 or "RANK" in os.environ:
        keep_freed_memory()
        code = run_cli(lambda a: (check_device(a.gpu, a.device), main(a)), args)
        if dist.is_initialized():  # join the backend's threads: exiting while they run can abort the process
            dist.destroy_process_group()
        sys.exit(code)
    code = run_cli(lambda a: check_device(a.gpu, a.device), args)
    if code:
        sys.exit(code)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # Same script, same flags but --nproc (torchrun's parser would take it for its own --nproc-per-node); the workers
    # see RANK and therefore run main() directly.
    argv = [a for a in sys.argv[1:] if not a.startswith("--nproc=")]
    if "--nproc" in argv:
        i = argv.index("--nproc")
        del argv[i:i + 2]
    try:
        torchrun.main(["--standalone", f"--nproc-per-node={nproc}", sys.argv[0], *argv])
    except ChildFailedError as e:  # the workers have printed why; their exit code is the launcher's
        sys.exit(e.get_first_failure()[1].exitcode or 1)
    except SignalException as e:  # Ctrl-C: the launcher passed it on and the workers have saved and said so
        sys.exit(128 + e.sigval)


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a CPU step frees for the next step, as PyTorch's CUDA allocator does.

    By default glibc serves each block above a threshold (128 KiB, raised as such blocks are freed, to 32 MiB at
    most) with its own mmap, returns it to the kernel when freed, and trims the heap's free top. A CPU training or
    inference step frees activations of many MiB and allocates them again at the next step, so the kernel zero-fills
    every page of them again, on every step. With both thresholds raised the pages stay in the process, which then
    holds about the peak a step reaches anyway, somewhat more where freed blocks fragment the heap (benchmarks/
    README.md). Inherited by forked loader workers. Returns whether the settings took (glibc only: elsewhere nothing
    changes).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    # Older glibc releases refuse an mmap threshold above 32 MiB: blocks above it then keep their own mmap.
    mmap = libc.mallopt(m_mmap_threshold, 1 << 30) or libc.mallopt(m_mmap_threshold, 32 << 20)
    return bool(mmap and libc.mallopt(m_trim_threshold, 2**31 - 1))


def check_device(gpu: str | None, device: str) -> None:
    """Refuse -gpu / --device cuda when CUDA is not usable, rather than training on the CPU without a word."""
    wants_cuda = device == "cuda" or (device == "auto" and gpu is not None)
    if wants_cuda and not torch.cuda.is_available():
        asked = f"-gpu {gpu}" if gpu is not None else "--device cuda"
        fix = ("check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES" if torch.version.cuda else
               "install a CUDA build of torch")
        raise UserError(f"{asked}: CUDA is not available ({cuda_report()}). To use a GPU, {fix}; to train on the "
                        "CPU, pass --device cpu (and --nproc N for N processes).")
    if gpu is not None and device != "cpu" and len(gpu.split(",")) > torch.cuda.device_count():
        raise UserError(f"-gpu {gpu}: {len(gpu.split(','))} devices asked for, but only {torch.cuda.device_count()} "
                        f"are usable ({cuda_report()})")


def cuda_report() -> str:
    """What torch says about CUDA: its build and the devices it sees."""
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"torch {torch.__version__}, {build}, {torch.cuda.device_count()} CUDA devices visible"


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group when launched by torchrun (env://) and return this process's device.

    `device`: "cuda", "cpu", or "auto" (CUDA when available, else the CPU).
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"--device cuda: CUDA is not available ({cuda_report()}); pass --device cpu to use the CPU")
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
            # NCCL for CUDA tensors, gloo for the CPU ones (evaluation gathers its scores on the CPU).
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    if use_cuda:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """One line: the device this process trains on, how many processes, and why not CUDA when it is the CPU."""
    world = get_world_size()
    procs = f"{world} process{'es' if world > 1 else ''}" + (f" ({dist.get_backend()})" if world > 1 else "")
    if device.type == "cuda":
        return f"device: {device} ({torch.cuda.get_device_name(device)}), {procs}"
    why = "chosen with --device cpu" if torch.cuda.is_available() else f"CUDA not available: {cuda_report()}"
    return f"device: cpu ({why}), {procs}"


def any_rank(flags: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Element-wise OR of a boolean tensor over all ranks (the tensor itself when not distributed)."""
    if get_world_size() == 1:
        return flags.clone()
    combined = flags.to(device=device, dtype=torch.int32)
    dist.all_reduce(combined, op=dist.ReduceOp.MAX)
    return combined.cpu() > 0


def same_on_all_ranks(values: Sequence[int]) -> bool:
    """Whether every rank passed the same integers (int64; True when not distributed). Collective."""
    if get_world_size() == 1:
        return True
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    both = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)  # the maxima, and minus the minima
    highest, lowest = both.cpu().view(2, -1)
    return bool(torch.equal(highest, -lowest))


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
            try:  # optional dependency (requirements-dev.txt), imported only when asked for
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError(f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard, or "
                                "leave out --tensorboard (log.jsonl has the same numbers)") from e
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, stats: dict, step: float) -> None:
        """Write one line; `step` is the (fractional) epoch. A line cut short (a kill or a full disk while
        appending) is ended first, so that it stays the only unreadable one (`read_log` skips it)."""
        if not is_main_process():
            return
        line = json.dumps({"epoch": step, **stats}) + "\n"
        with open(self.path, "a+b") as f:
            if f.tell() > 0:  # append mode starts at the end
                f.seek(-1, os.SEEK_END)
                line = ("" if f.read(1) == b"\n" else "\n") + line
            f.write(line.encode())
        if self.writer is not None:
            for key, value in stats.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, global_step=round(step * 1000))
            self.writer.flush()


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a run's log.jsonl ([] if there is none); a line that does not parse (cut short by a kill or a
    full disk) is skipped with a warning naming the file and the line."""
    path, records = Path(path), []
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"warning: {path}, line {number}: not a JSON record ({e}); skipped", file=sys.stderr)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_json(obj: object, path: str | os.PathLike) -> None:
    """Write JSON atomically (rank 0 decides whether to call this)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# Command-line flags shared by the three recipes, and their checks
# ----------------------------------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every recipe has: devices, run folder, checkpoints, precision, loader workers, seed."""
    g = parser.add_argument_group("devices and run")
    g.add_argument("-gpu", "--gpu", default=None,
                   help="Comma-separated CUDA devices, e.g. 0,1,2,3: one DDP process per device (the original "
                        "repository's interface). Default: all visible devices of a torchrun launch, else the CPU. "
                        "Stops with an error when CUDA is not usable, unless --device cpu is given.")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="Where to train: auto (CUDA when available, else the CPU), cuda (stop if CUDA is not usable) "
                        "or cpu (even when a GPU is there; with -gpu, one CPU process per listed device).")
    g.add_argument("--nproc", type=int, default=1,
                   help="Number of CPU processes (gloo) when no GPU is used; >1 is for testing the distributed path.")
    g.add_argument("--output-dir", default=None,
                   help="Run folder for args.json, log.jsonl, checkpoints and plots. Default: logs/<model>_<dataset>. "
                        "Re-running the same command resumes from the checkpoint found there; other settings are "
                        "refused (see --restart).")
    g.add_argument("--restart", action="store_true",
                   help="Start the run folder over: its checkpoints and logs are moved to <run>/previous_<n>/ and "
                        "training starts from scratch (needed to change the model, input, schedule or seed of a run).")
    g.add_argument("--resume", default=None, help="Checkpoint to resume from (weights, optimizer, epoch, iteration).")
    g.add_argument("--finetune", default=None,
                   help="Checkpoint to initialise the weights from (any supported format; a classifier of another "
                        "size is dropped). Optimizer and epoch start fresh.")
    g.add_argument("--save-every", type=int, default=500,
                   help="Also write a checkpoint every N iterations, so a killed run loses at most N iterations "
                        "(Ctrl-C saves one at once and prints the command that resumes).")
    g.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"],
                   help="Autocast precision on CUDA (bf16 needs no loss scaling). Ignored on the CPU, where measured "
                        "bf16 autocast was slower than fp32.")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="Train through torch.compile (backend inductor unless named): one graph per batch shape of "
                        "the schedule, compiled at its first step. Off by default: on the CPU it took minutes per "
                        "shape to compile and did not train faster (benchmarks/README.md); meant for CUDA.")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="Data-loading processes per training process (default: 8, or the number of cores if fewer).")
    g.add_argument("--seed", type=int, default=0, help="Seed for sampling, augmentation and initialisation.")
    g.add_argument("--tensorboard", action="store_true", help="Also write TensorBoard scalars to <run>/tb.")
    g.add_argument("--no-progress", action="store_true", help="Disable the progress bar (e.g. for log files).")
    return parser


def add_input_args(parser: argparse.ArgumentParser, models: Sequence[str],
                   rate_unit: str = "frames of a 30-fps video") -> argparse.ArgumentParser:
    """Flags of the model and its clip input; a flag left out keeps the variant's (or the recipe's) default."""
    parser.add_argument("--model", default="x3d_m", choices=models, help="X3D variant (default: %(default)s).")
    g = parser.add_argument_group("input (defaults: the variant's own, see x3d.py, unless the recipe says otherwise)")
    g.add_argument("--frames", type=int, help="Frames per clip at the base (full) multigrid shape.")
    g.add_argument("--sampling-rate", type=int, help=f"Frame stride at the base shape, in {rate_unit}.")
    g.add_argument("--crop", type=int, help="Training crop at the base shape.")
    g.add_argument("--jitter", type=int, nargs=2, metavar=("MIN", "MAX"), help="Short-side scale jitter range.")
    g.add_argument("--test-crop", type=int, help="Crop of the test views (short side resized to it).")
    g.add_argument("--flip-prob", type=float, default=0.5,
                   help="Probability of a horizontal flip in training; 0 where left and right differ (the demo).")
    g.add_argument("--backend", default="auto", choices=["auto", "pyav", "torchcodec"], help="Video decoder.")
    return parser


def add_optimisation_args(parser: argparse.ArgumentParser, lr_rule: str,
                          lr_policies: Sequence[str] = ("cosine", "steps")) -> argparse.ArgumentParser:
    """Flags of the schedule and the optimiser; `lr_rule` says how the default LR follows the batch."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=16,
                   help="Clips per device at the base shape (default: %(default)s); multigrid multiplies it at "
                        "coarser shapes.")
    g.add_argument("--epochs", type=int, default=300,
                   help="Epochs of the fixed-shape recipe (default: %(default)s). Multigrid derives its schedule "
                        "from it, stretching it by --epoch-factor as the paper does.")
    g.add_argument("--lr", type=float, default=None,
                   help=f"Learning rate at the base shape. Default: {lr_rule}, scaled linearly with the global batch.")
    g.add_argument("--lr-policy", default=lr_policies[0], choices=lr_policies,
                   help="cosine: half a cosine to 0 over the run; steps: ×0.1 at each of --steps"
                        + ("; plateau: ×0.1 when the validation loss has not improved for more than --patience "
                           "evaluations"
                           if "plateau" in lr_policies else "") + " (default: %(default)s).")
    g.add_argument("--steps", type=int, nargs="*", default=None, help="Epochs where a step schedule decays ×0.1.")
    if "plateau" in lr_policies:
        g.add_argument("--patience", type=int, default=2,
                       help="Evaluations in a row without a lower validation loss that the plateau policy "
                            "tolerates; the next one divides the LR by 10 (PyTorch's ReduceLROnPlateau; default: "
                            "%(default)s).")
    g.add_argument("--warmup-epochs", type=float, default=35.0,
                   help="Linear warm-up length in epochs (default: %(default)s).")
    g.add_argument("--weight-decay", type=float, default=5e-5,
                   help="On conv/linear weights only (default: %(default)s).")
    g.add_argument("--dropout", type=float, default=0.5, help="Dropout before the classifier (default: %(default)s).")
    g.add_argument("--clip-grad", type=float, default=None, help="Clip the gradient norm to this value.")
    g.add_argument("--multigrid", default="both", choices=["both", "long", "short", "none"],
                   help="Which multigrid cycles to use; `none` is the plain fixed-shape recipe (default: %(default)s).")
    g.add_argument("--epoch-factor", type=float, default=1.5,
                   help="Multigrid stretches the epoch count by this factor (the paper's 1.5).")
    g.add_argument("--min-frames", type=int, default=2,
                   help="Fewest frames of a long-cycle shape (default: %(default)s; a 1-frame clip shows no motion, "
                        "and X3D-XS's T0/4 is 1 frame). 1 is the paper's rule.")
    return parser


def add_evaluation_args(parser: argparse.ArgumentParser, temporal_views: bool = True) -> argparse.ArgumentParser:
    """Flags of the evaluations during training and of the final test (`temporal_views`: the test has --test-views)."""
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true",
                   help="Only evaluate (the final test's protocol) the weights of --resume or of the run folder, in "
                        "any supported format, and exit.")
    g.add_argument("--eval-every", type=int, default=10,
                   help="Epochs between evaluations on the validation set during training (default: %(default)s).")
    g.add_argument("--precise-bn-batches", type=int, default=200,
                   help="Training batches used to recompute BN statistics before each evaluation (0: off; default: "
                        "%(default)s).")
    if temporal_views:
        g.add_argument("--val-views", type=int, default=1,
                       help="Temporal clips per video (one crop each) in the evaluations during training (default: "
                            "%(default)s).")
        g.add_argument("--test-views", type=int, default=10,
                       help="Temporal clips per video in the final test (0: no test; default: %(default)s).")
    g.add_argument("--test-crops", type=int, default=3, choices=[1, 3],
                   help="Spatial crops per clip in the final test (default: %(default)s).")
    g.add_argument("--max-failure-fraction", type=float, default=0.1,
                   help="Stop if more than this fraction of videos fails to decode (each failure is skipped).")
    return parser


# Flags that shape a run: resuming a run folder with other values would mix two trainings, so it is refused.
RUN_FLAGS = ("model", "frames", "sampling_rate", "crop", "jitter", "test_crop", "flip_prob", "batch_size", "epochs",
             "lr", "lr_policy", "steps", "patience", "warmup_epochs", "weight_decay", "dropout", "clip_grad",
             "multigrid", "epoch_factor", "min_frames", "seed")
PLATEAU_FLAGS = ("eval_every", "val_views", "precise_bn_batches")  # the evaluations set a plateau policy's LR
INPUT_FLAGS = (("frames", "frames"), ("sampling_rate", "sampling_rate"), ("train_crop", "crop"),
               ("train_jitter", "jitter"), ("test_crop", "test_crop"))  # (input field, flag)


def input_spec(args: argparse.Namespace, defaults: dict) -> dict:
    """The clip input (frames, sampling_rate, train_crop, train_jitter, test_crop): `defaults` (the variant's, the
    recipe's or the checkpoint's), overridden by each input flag given."""
    spec = {**defaults, "train_jitter": tuple(defaults["train_jitter"])}
    for key, flag in INPUT_FLAGS:
        if getattr(args, flag) is not None:
            spec[key] = tuple(getattr(args, flag)) if key == "train_jitter" else getattr(args, flag)
    return spec


def check_args(args: argparse.Namespace, spec: dict, extra: Iterable[tuple[bool, str]] = ()) -> None:
    """Every combination of the shared flags that cannot work, named by its flags, before any data is indexed or
    model built; `extra`: the recipe's own (condition, message) pairs."""
    steps = args.steps or []
    need = [
        (Path(args.data_root).is_dir(), f"--data-root {args.data_root} does not exist or is not a folder"),
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (0 <= args.warmup_epochs < args.epochs,
         f"--warmup-epochs {args.warmup_epochs:g} must be in [0, --epochs {args.epochs}) (give a shorter warm-up "
         f"for a shorter run)"),
        (args.lr is None or args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (args.lr_policy != "steps" or bool(args.steps), "--lr-policy steps needs --steps (epochs where the LR decays)"),
        (all(a < b for a, b in zip([-1, *steps], steps)) and all(s < args.epochs for s in steps),
         f"--steps {steps} must increase and stay below --epochs {args.epochs}"),
        (args.lr_policy != "steps" or args.multigrid in ("short", "none") or any(steps),
         "--lr-policy steps with the long cycle (--multigrid both/long) needs a --steps epoch after 0"),
        (args.lr_policy != "plateau" or args.multigrid in ("short", "none"),
         "--lr-policy plateau decides its decays during training, but the long cycle (--multigrid both/long) lays "
         "its LR stages out in advance: use --multigrid short or none, or --lr-policy cosine"),
        (getattr(args, "patience", 0) >= 0, "--patience must be at least 0"),
        (args.epoch_factor > 0, f"--epoch-factor must be positive, got {args.epoch_factor}"),
        (args.min_frames >= 1, f"--min-frames must be at least 1, got {args.min_frames}"),
        (min(spec["frames"], spec["sampling_rate"]) >= 1, "--frames and --sampling-rate must be at least 1"),
        (spec["train_crop"] >= 4 and spec["test_crop"] >= 1, "--crop must be at least 4 and --test-crop at least 1"),
        (spec["train_crop"] <= spec["train_jitter"][0] <= spec["train_jitter"][1],
         f"--jitter {list(spec['train_jitter'])} must be MIN <= MAX with MIN at least --crop {spec['train_crop']}"),
        (0 <= args.flip_prob <= 1 and 0 <= args.dropout < 1, "--flip-prob must be in [0, 1] and --dropout in [0, 1)"),
        (args.clip_grad is None or args.clip_grad > 0, f"--clip-grad must be positive, got {args.clip_grad}"),
        (0 <= args.max_failure_fraction <= 1, f"--max-failure-fraction must be in [0, 1], got "
                                                f"{args.max_failure_fraction}"),
        (args.eval_every >= 1 and getattr(args, "val_views", 1) >= 1,
         "--eval-every and --val-views must be at least 1"),
        (getattr(args, "test_views", 0) >= 0 and args.precise_bn_batches >= 0,
         "--test-views and --precise-bn-batches must be at least 0"),
        (args.save_every >= 0 and args.workers >= 0 and args.nproc >= 1,
         "--save-every and --workers must be at least 0, --nproc at least 1"),
        (not (args.eval and getattr(args, "test_views", 1) == 0), "--eval runs the test: --test-views must be at "
                                                                    "least 1"),
        (not (args.restart and (args.eval or args.resume)), "--restart starts the run folder over: it cannot be "
                                                             "combined with --eval or --resume"),
        (args.gpu is None or all(d.strip().isdigit() for d in args.gpu.split(",")),
         f"-gpu takes comma-separated device numbers like 0,1,2,3, got {args.gpu!r}"),
        *extra,
    ]
    for ok, message in need:
        if not ok:
            raise UserError(message)
    check_device(args.gpu, args.device)


def check_same_run(args: argparse.Namespace, saved: dict, source: Path) -> None:
    """Refuse to resume a checkpoint trained with other run-shaping flags (RUN_FLAGS, and PLATEAU_FLAGS under the
    plateau policy), naming every difference."""
    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    def shown(value):
        return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    changed = [f"--{k.replace('_', '-')} {shown(getattr(args, k))} (the run has {shown(saved[k])})"
               for k in RUN_FLAGS + (PLATEAU_FLAGS if getattr(args, "lr_policy", "") == "plateau" else ())
               if k in saved and hasattr(args, k) and plain(saved[k]) != plain(getattr(args, k))]
    if changed:
        raise UserError(
            f"{source} was trained with other settings: {'; '.join(changed)}. Give the run's own flags to resume it "
            f"(they are in its args.json), pass --restart to start the folder over, or choose another --output-dir.")


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
    for stale in Path(run_dir).glob(".checkpoint*.pt.tmp*"):  # a killed writer's, or a link left below
        stale.unlink(missing_ok=True)
    if latest.exists():
        tmp = _temp_path(previous)
        try:
            os.link(latest, tmp)
        except OSError:
            shutil.copyfile(latest, tmp)
        os.replace(tmp, previous)
        # Where `previous` already was `latest` (a kill between the two steps last time), the rename leaves both
        # names: POSIX renames nothing between two links to one file.
        tmp.unlink(missing_ok=True)
    save_checkpoint(obj, latest)
    return latest


def load_run_checkpoint(run_dir: str | os.PathLike,
                        explicit: str | os.PathLike | None = None) -> tuple[dict, Path] | None:
    """The checkpoint to resume from: `explicit` if given, else the run folder's latest readable one, else None.

    A damaged latest file is reported (path and reason) and the previous checkpoint is used instead. The main process
    moves the damaged file aside to `checkpoint_damaged.pt`, so that the next save does not keep it as
    `checkpoint_prev.pt` in place of the good one. A file whose loading would run code is not damage: it stops the
    run with an UnsafeCheckpointError and stays where it is.
    """
    if explicit is not None:
        return load_checkpoint_file(explicit), Path(explicit)
    candidates = [p for p in (Path(run_dir) / "checkpoint.pt", Path(run_dir) / "checkpoint_prev.pt") if p.exists()]
    for i, path in enumerate(candidates):
        try:
            return load_checkpoint_file(path), path
        except UnsafeCheckpointError as e:
            # Not damage: this project never writes such a file, so someone or something replaced it. Stop rather
            # than quietly resume from the previous checkpoint, and leave the file where it is for inspection.
            raise UnsafeCheckpointError(
                f"{e} This project never writes such a file into a run folder, so it was replaced by someone or "
                f"something else: not resuming. Inspect it, then delete it to resume from "
                f"{candidates[i + 1] if i + 1 < len(candidates) else 'scratch'}.") from e
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


def start_over(run_dir: str | os.PathLike) -> Path | None:
    """Move a run folder's checkpoints, logs and plots into `<run>/previous_<n>/` (--restart); None if it had none."""
    run_dir = Path(run_dir)
    names = ["checkpoint.pt", "checkpoint_prev.pt", "checkpoint_damaged.pt", "args.json", "schedule.json",
             "log.jsonl", "tb", "curves.png", "schedule.png"]
    present = [run_dir / n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    n = 1
    while (run_dir / f"previous_{n}").exists():
        n += 1
    target = run_dir / f"previous_{n}"
    target.mkdir()
    for path in present:
        os.replace(path, target / path.name)
    return target


# ----------------------------------------------------------------------------------------------------------------------
# Ctrl-C: finish the step in progress, save, and say how to resume
# ----------------------------------------------------------------------------------------------------------------------
class StopRequest:
    """While active (a `with` block or `during`), Ctrl-C (SIGINT) sets `requested` instead of raising KeyboardInterrupt.

    The training loop polls it between steps, so the model and optimizer are saved in a consistent state (a
    KeyboardInterrupt inside optimizer.step() could leave half-updated weights). Every rank gets the signal from the
    terminal, but not at the same step: the loop combines the flags across ranks before acting (`engine`). A second
    Ctrl-C in a single process gives up waiting and raises KeyboardInterrupt; under torchrun the launcher forwards
    its own SIGINT to the workers, so a repeat is expected there and ignored.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __call__(self) -> bool:
        return self.requested

    def during(self, items: Iterable[int]) -> Iterator[int]:
        """Iterate over `items` with the handler installed; it is restored when the loop ends or is left."""
        with self:
            yield from items

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and "RANK" not in os.environ:
            raise KeyboardInterrupt
        if not self.requested and is_main_process():
            print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit at once)",
                  file=sys.stderr, flush=True)
        self.requested = True


def init_loader_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore Ctrl-C, and decode at the lowest CPU priority.

    Ctrl-C reaches the whole process group; only the main process acts on it. The low priority matters where the
    workers share cores with the training step (CPU training, or more workers than free cores): a worker that takes a
    core from one of the step's threads stalls the others at its next barrier, so the step slows down by far more than
    the decoding time. At the lowest priority the workers decode in the step's idle moments and whenever the main
    process waits for a batch; where cores are free it changes nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # where it is not permitted, decode at the default priority
        os.nice(19)


def command_line() -> str:
    """The command that started this process, quoted for a shell, to print how to resume (without --restart, which
    would start the run over)."""
    return shlex.join(["python", *(a for a in sys.argv if a != "--restart")])
