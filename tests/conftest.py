import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pools():
    from tests.dist.pool import Pools

    p = Pools()
    yield p
    p.close()
