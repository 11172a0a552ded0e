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


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Seed torch's global generator from the test's id before every test.

    Parity tests that want fresh inputs call ``kt.fresh_seed()`` (clock seed, printed on
    failure). Every other test used to inherit whatever state the tests before it left, so in
    a full run it drew clock-random inputs while on its own it was deterministic: a chance
    failure seen in CI could not be reproduced by running its file. Now it draws the same
    inputs however the suite is run."""
    import zlib
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
