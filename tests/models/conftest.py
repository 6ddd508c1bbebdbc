import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    """Every test in tests/models starts from the same RNG state and runs its tiny models on one CPU thread (on a
    shared 2-core machine OpenMP threads spinning against other processes cost far more than they give)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
