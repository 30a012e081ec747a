"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Model tests use tiny tensors: extra threads only add synchronisation, and on a loaded machine spinning OpenMP
    threads slow every op down many times over. (Subprocess tests set OMP_NUM_THREADS themselves.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
