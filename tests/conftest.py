"""Shared test settings."""

import os

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
