"""Shared test settings."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

# The depthwise backward is otherwise chosen by timing (depthwise_conv.py): runs compared for identical weights, here
# and in the subprocesses the tests start, need the same one every time. Tests of the timed choice set `auto`.
os.environ.setdefault("X3D_DEPTHWISE_BACKWARD", "own")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Model tests use tiny tensors: extra threads only add synchronisation, and on a loaded machine spinning OpenMP
    threads slow every op down many times over. (Subprocess tests set OMP_NUM_THREADS themselves.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def signal_mid_epoch():
    """`signal_mid_epoch(proc, run_dir, reached, sig)`: send `sig` to a training subprocess once its latest checkpoint
    is a mid-epoch one for which `reached(checkpoint)` holds; returns that checkpoint, or None if the run ended first.

    Polling alone races the run: an iteration can end, and a save replace the checkpoint seen, between the look and the
    signal. So the run is paused (SIGSTOP) when a checkpoint qualifies, the file is read again while nothing can
    change it, and only then signalled; if the pause caught it elsewhere (an epoch's end) it runs on."""
    from utils import CheckpointError, load_checkpoint_file

    def send(proc: subprocess.Popen, run_dir: Path, reached, sig: int) -> dict | None:
        def latest() -> dict | None:
            try:
                ckpt = load_checkpoint_file(Path(run_dir) / "checkpoint.pt")
            except (CheckpointError, OSError):
                return None
            return ckpt if ckpt["iteration"] > 0 and reached(ckpt) else None

        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if latest() is not None:
                proc.send_signal(signal.SIGSTOP)
                ckpt = latest()
                if ckpt is not None:
                    proc.send_signal(sig)
                proc.send_signal(signal.SIGCONT)  # a stopped process acts on a caught signal once continued
                if ckpt is not None:
                    return ckpt
            time.sleep(0.02)
        return None

    return send
