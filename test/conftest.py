import sys
from pathlib import Path

import pytest

# Test helpers (reference implementations, fixtures) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: thread synchronisation costs more than it saves, badly so on a busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
