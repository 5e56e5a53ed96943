"""Fixtures shared by every test folder."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread, restored after. Tiny tensors run fastest on one thread (on a busy 2-core machine two
    threads wait on each other); servers default to one thread and their in-process references must match,
    since the thread count changes how sums are split and so the last bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
