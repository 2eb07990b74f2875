"""Test setup: deterministic seeds and a fixed thread count for 2-core CI machines, and one rule for test
dependencies that may be missing (transformers, tokenizers, triton, matplotlib, pyarrow): a test needing one
calls `requires(name)` (at a test file's top, or in the test) or is marked `@pytest.mark.requires(name)`; without
it the test is skipped with the reason shown (`pytest -rs` lists them), but fails when the CI environment
variable is set, since CI (.ci/run) installs requirements-dev.txt and a missing module there is a broken setup."""
import importlib
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


def requires(name):
    """The module `name`, imported; missing: the test (or, called at a file's top, the file) is skipped, and
    under CI it fails."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        why = f"needs {name} ({e}; pip install -r requirements-dev.txt)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI is set and a test {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (CI still runs them)")
    config.addinivalue_line("markers", "requires(name): the test needs module `name` (see conftest.requires)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires"):
        requires(*mark.args)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
