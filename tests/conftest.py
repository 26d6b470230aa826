"""Shared test setup: import path for ``helpers``, seeds, threads, hypothesis profiles, fixtures."""
import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# One intra-op thread: on the 2-core machines the tests share with other
# processes, OpenMP threads contending for the cores made float64 convolutions
# 10-20x slower (mnasnet0_5 forward 3 s instead of 0.16 s). Override with
# CAPTUM_GRAPH_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("CAPTUM_GRAPH_TEST_THREADS", "1")))

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; the rest of the suite runs without it
    settings = None

if settings is not None:
    # ci: reproducible (derandomized), no per-example deadline (CPU timings vary a lot).
    settings.register_profile(
        "ci",
        deadline=None,
        derandomize=True,
        max_examples=25,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    # dev: random exploration with more examples.
    settings.register_profile("dev", deadline=None, max_examples=100)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)
    random.seed(0)
    yield


@pytest.fixture
def assert_untouched():
    """``with assert_untouched(model[, inputs]): ...`` -- the model is exactly as before.

    Checks state dict and buffers bit for bit, parameter identity and flags,
    every hook dictionary, ``training``/``inplace`` flags, the attributes of
    every module (no leftover ``rule``/``activations``) and, given inputs, the
    output; also when the body raises. See :func:`helpers.oracles.assert_untouched`.
    """
    from helpers.oracles import assert_untouched as check

    return check
