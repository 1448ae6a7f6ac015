"""Shared pytest set-up for the whole suite."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny test models are dominated by per-op overhead; on a 2-core box a second intra-op thread only
    contends (with the other core, and with the subprocesses some tests spawn)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
