import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test in tests/models starts from the same RNG state (random inputs, random model weights)."""
    torch.manual_seed(0)
