"""Shared pytest configuration for the knnfast test-suite.

* ``DEVICES``: parametrize list, "cpu" always, "cuda" skipped with the reason
  "no CUDA device" when torch has no usable GPU (so the skip is visible in -rs).
* hypothesis profile "knnfast" (the default): no deadline, few examples, so the
  whole suite runs in a few minutes on a 2-core machine. Set
  HYPOTHESIS_PROFILE=thorough for a longer run.
* every test starts from the same torch seed.
"""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # for `import helpers`

settings.register_profile(
    "knnfast",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "knnfast"))

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
    ),
]
devices = DEVICES  # alias: `from conftest import devices`


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def gen():
    """A seeded CPU generator for tests that want their own stream."""
    g = torch.Generator()
    g.manual_seed(1234)
    return g
