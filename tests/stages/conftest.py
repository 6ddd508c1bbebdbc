"""Fixtures of the stage tests.

`one_thread` runs a test's torch work on one thread: on a shared 2-core machine two OpenMP threads spin against
other processes and make tiny models many times slower; one thread is fast under any load.
"""
import pytest
import torch


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
