"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture(scope='module')
def single_thread():
    """These models are tiny: one thread is fastest, and spared the OpenMP wake-ups that stall a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
