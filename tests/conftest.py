"""Shared fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one torch CPU thread (stable timings and reduction order), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
