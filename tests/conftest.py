"""Shared pytest configuration for the knnfast test-suite.

* ``DEVICES``: parametrize list, "cpu" always, "cuda" skipped with the reason
  "no CUDA device" when torch has no usable GPU, or with a reason naming the build when
  knnfast was compiled without its CUDA kernels (so the skip is visible in -rs).
* ``requires_cuda``: the same skip as a mark, for CUDA-only tests.
* hypothesis profile "knnfast" (the default): no deadline, few examples, so the
  whole suite runs in a few minutes on a 2-core machine. Set
  HYPOTHESIS_PROFILE=thorough for a longer run.
* every test starts from the same torch seed.
* KNNFAST_CALIBRATE=0 unless set: CPU knn_search(plan="auto") keeps the fixed plan rule, so
  the plans a test runs do not depend on timings and no plan cache is written under the
  user's home (also by the commands tests start); tests/test_knn_search_plans.py turns the
  measurement on where it tests it.
* tqdm starts no monitor thread: tests/fault_helpers.in_child forks pytest's process, and a
  child forked while that thread held tqdm's lock would hang on its first progress bar.
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

os.environ.setdefault("KNNFAST_CALIBRATE", "0")  # read at import knnfast
import knnfast  # noqa: E402

try:
    import tqdm
    tqdm.tqdm.monitor_interval = 0
except ImportError:  # tqdm is optional for the library
    pass

HAS_GPU = torch.cuda.is_available()
CUDA_BUILT = knnfast.build_info()["cuda_compiled"]
HAS_CUDA = HAS_GPU and CUDA_BUILT
CUDA_SKIP_REASON = ("no CUDA device" if not HAS_GPU else
                    "knnfast was built without its CUDA kernels (no nvcc or a CPU-only torch "
                    "at build time)")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=requires_cuda),
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


@pytest.fixture(scope="module")
def single_threaded():
    """torch and FAISS on one thread for modules of tiny tensors and models: on a busy 2-core
    box, OpenMP wake-ups of idle threads cost more than the work (seconds per module)."""
    import faiss
    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_before)
    faiss.omp_set_num_threads(faiss_before)


@pytest.fixture(scope="session")
def reproduce_cache(tmp_path_factory):
    """One cache root for every quick `knnfast reproduce` study of the session, so the MT
    studies share one tiny base model and datastore (as full runs do)."""
    return tmp_path_factory.mktemp("reproduce-cache")
