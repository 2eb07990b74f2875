"""Test setup: deterministic seeds and a fixed thread count for 2-core CI machines."""
import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)
if not torch.cuda.is_available():  # CI: Triton kernels run in its CPU interpreter (read at kernels import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (CI still runs them)")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
