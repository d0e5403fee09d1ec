"""``one_thread``: a module-scoped autouse fixture for test modules of tiny models (import it into the module)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only spin, and on a busy machine (or ``-n 2`` on 2 cores) they make the checks
    10-100x slower. One thread per worker for the importing module; the previous setting is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
