"""knn_search's CPU plans, forced one by one, and plan="auto" chosen by measurement.

Kernel / variant -> tests:

  every forced CPU plan (stream, gemm_f32, bf16, bf16_gemm): ties, NaN/inf keys, k > N
      test_forced_plan_ties_go_to_smaller_index, test_forced_plan_non_finite_keys,
      test_forced_plan_k_greater_than_n (exactness, exclude, metrics, dtypes, key_sq_norms and
      the bounds: tests/test_knn_search.py, FORCED KERNEL PATHS)
  bf16_gemm on the portable code (push_tile_generic)   test_bf16_gemm_portable_path
  bf16 / bf16_gemm error bounds, checked key by key     test_debug_checks_bounds_*
      (configure("debug", 1): verify_tile)
  knnfast/ops/plan_choice.py                            the test_auto_* tests
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from knnfast.ops import plan_choice, settings
from helpers import KEY_DTYPES, METRICS, assert_topk_parity, assert_topk_valid, exact_scores

PLANS = [p for p in knnfast.build_info()["cpu_plans"] if p != "auto"]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
def test_forced_plan_ties_go_to_smaller_index(plan, key_dtype, metric):
    """Small integers: every score is exact in bf16 and fp32, so ties are exact and the order
    (score desc, index asc) is fully determined, also across tiles and threads."""
    B, N, D, k = 40, 1500, 4, 50
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-2, 3, (B, D), generator=g).float()
    keys = torch.randint(-1, 2, (N, D), generator=g).to(key_dtype)
    s, i = knnfast.knn_search(q, keys, k, metric, plan=plan)
    exp_s, exp_i = torch.sort(exact_scores(q, keys, metric), dim=1, descending=True, stable=True)
    assert torch.equal(i, exp_i[:, :k]), f"{plan}: tie order differs"
    assert torch.equal(s.double(), exp_s[:, :k])


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
def test_forced_plan_non_finite_keys(plan, key_dtype, metric):
    """NaN keys are never returned; an inf key only where its exact score says so (never for
    l2/cos, whose exact scores are NaN or -inf)."""
    B, N, D = 36, 600, 24
    g = torch.Generator().manual_seed(4)
    q, keys = torch.randn(B, D, generator=g), torch.randn(N, D, generator=g).to(key_dtype)
    keys[7] = float("nan")
    keys[20, 3] = float("nan")
    keys[300, 5] = float("inf")
    exclude = torch.randint(-1, N, (B,), generator=g)
    s, i = knnfast.knn_search(q, keys, 10, metric, exclude=exclude, plan=plan)
    assert not ((i == 7) | (i == 20)).any()
    if metric != "ip":
        assert not (i == 300).any()
    assert_topk_valid(s, i, q, keys, 10, metric, exclude=exclude)


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
def test_forced_plan_k_greater_than_n(plan, key_dtype, metric):
    B, N, D, k = 33, 40, 9, 64
    q, keys = torch.randn(B, D), torch.randn(N, D).to(key_dtype)
    s, i = knnfast.knn_search(q, keys, k, metric, plan=plan)
    assert (i[:, N:] == -1).all() and torch.isneginf(s[:, N:]).all()
    rs, ri = ref.knn_search(q, keys.float(), k, metric)
    assert_topk_parity(s, i, rs, ri, q, keys, metric)


def test_bf16_gemm_portable_path():
    """KNNFAST_SIMD=generic: bf16_gemm's candidate test runs in portable code (a CPU without
    AVX-512) and stays exact, for every metric, with a large common component."""
    script = textwrap.dedent("""
        import torch, knnfast, knnfast.reference as ref
        assert knnfast.build_info()["simd"] == "generic"
        g = torch.Generator().manual_seed(5)
        keys = (torch.randn(3000, 70, generator=g) + 8.0).half()
        q = torch.randn(40, 70, generator=g) + 8.0
        for metric in ("l2", "ip", "cos"):
            s, i = knnfast.knn_search(q, keys, 8, metric, plan="bf16_gemm")
            rs, ri = ref.knn_search(q, keys.float(), 8, metric)
            assert torch.equal(i, ri), metric
        print("ok")
    """)
    env = dict(os.environ, KNNFAST_SIMD="generic", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


BF16_PLANS = [p for p in PLANS if p.startswith("bf16")]
H = 2.0 ** -8  # bf16's unit roundoff: half the spacing of bf16 numbers in [1, 2)


def _worst_rounding_case(scale):
    """D = 1, where Cauchy-Schwarz is tight: q and k lie just under a half-way point, so both
    round up by almost u (to 1.0625 and 1.0703125), and their product 1.1372 lies just over one,
    so at::mm's bf16 output rounds up again: about 2.66 u of |q| |k| in all. bf16_gemm's bound
    holds only with its output-rounding term, the vdpbf16ps kernel's only with both input
    terms. Keys k, -k put the center at 0."""
    q = torch.tensor([[1.0625 - H + 1e-6]]) * scale
    k = 1.0703125 - H + 1e-6
    return q, torch.tensor([[k], [-k]]) * scale


@pytest.mark.parametrize("plan", BF16_PLANS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("scale", [1.0, -4.0, 2.0 ** -20])
def test_debug_checks_bounds_on_the_worst_rounding(plan, metric, scale):
    q, keys = _worst_rounding_case(scale)
    with settings.override(debug=True):
        s, i = knnfast.knn_search(q, keys, 1, metric, plan=plan)
    rs, ri = ref.knn_search(q, keys, 1, metric)
    assert torch.equal(i, ri)


@pytest.mark.parametrize("plan", BF16_PLANS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
def test_debug_checks_bounds_on_hidden_state_like_data(plan, metric, key_dtype):
    """Every (query, key) bound of a search whose vectors share a large common component, as
    hidden states do, checked against the float64 rank; the result stays exact."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(70, 48, generator=g) + 6.0
    keys = (torch.randn(1100, 48, generator=g) + 6.0).to(key_dtype)
    with settings.override(debug=True):
        s, i = knnfast.knn_search(q, keys, 8, metric, plan=plan)
    rs, ri = ref.knn_search(q, keys.float(), 8, metric)
    assert_topk_parity(s, i, rs, ri, q, keys, metric)


@pytest.mark.parametrize("plan", BF16_PLANS)
@pytest.mark.parametrize("metric", METRICS)
def test_debug_checks_bounds_for_tiny_queries_and_centers(plan, metric):
    """Queries near 1e-30 (their fp32 squares underflow, so |q| must not be taken from them:
    a bound built on |q| = 0 failed for ip and cos) against keys with large coordinates, and
    keys near 1e-30 (a tiny center); the bounds hold and the result is exact."""
    g = torch.Generator().manual_seed(9)
    keys = torch.randn(600, 24, generator=g)
    keys[torch.randint(0, 600, (40,), generator=g), torch.randint(0, 24, (40,), generator=g)] += 1e4
    q = torch.randn(40, 24, generator=g) * 1e-30
    for k in (keys, keys * 1e-30):
        with settings.override(debug=True):
            s, i = knnfast.knn_search(q, k, 5, metric, plan=plan)
        rs, ri = ref.knn_search(q, k, 5, metric)
        assert_topk_parity(s, i, rs, ri, q, k, metric)


@pytest.mark.parametrize("plan", BF16_PLANS)
@given(B=st.integers(1, 40), N=st.integers(1, 400), D=st.integers(1, 40), k=st.integers(1, 20),
       metric=st.sampled_from(METRICS), seed=st.integers(0, 2**31 - 1),
       offset=st.sampled_from([0.0, 6.0]), q_scale=st.sampled_from([1.0, 1e-40, 1e-35, 1e-30, 1e-18, 1e6, 1e15]),
       k_scale=st.sampled_from([1.0, 1e-40, 1e-35, 1e-30, 1e-18, 1e6, 1e15]))
def test_property_bf16_plans_exact_at_any_scale(plan, B, N, D, k, metric, seed, offset,
                                                q_scale, k_scale):
    """The bf16 plans' bounds checked key by key, and the result exact, for queries and keys
    scaled apart or together (tiny vectors' fp32 squares underflow)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, D, generator=g) + offset) * q_scale
    keys = (torch.randn(N, D, generator=g) + offset) * k_scale
    with settings.override(debug=True):
        s, i = knnfast.knn_search(q, keys, k, metric, plan=plan)
    rs, ri = ref.knn_search(q, keys, k, metric)
    assert_topk_parity(s, i, rs, ri, q, keys, metric)


# --------------------------------------------------------------------------- #
# plan="auto" by measurement (knnfast/ops/plan_choice.py)                     #
# --------------------------------------------------------------------------- #
@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    """A fresh cache file and no in-memory choices; calibration on, every search measured."""
    path = tmp_path / "plans.json"
    monkeypatch.setenv(plan_choice.CACHE_VARIABLE, str(path))
    monkeypatch.setattr(plan_choice, "MIN_WORK", 0)
    plan_choice.forget_choices()
    with plan_choice.calibration(True):
        yield path
    plan_choice.forget_choices()


@pytest.fixture
def calibrations(monkeypatch):
    """Counts the calibrations (they still run)."""
    calls = []
    real = plan_choice.calibrate

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)
    monkeypatch.setattr(plan_choice, "calibrate", counting)
    return calls


def _search_data(B=48, N=3000, D=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(6)
    return torch.randn(B, D, generator=g), torch.randn(N, D, generator=g).to(dtype)


@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
def test_auto_measures_once_per_bucket_and_persists(plan_cache, calibrations, key_dtype):
    q, keys = _search_data(dtype=key_dtype)
    s, i = knnfast.knn_search(q, keys, 8, "l2")
    knnfast.knn_search(q[:40], keys, 7, "l2")  # same bucket (B 33..64, k 5..8): no new timing
    assert len(calibrations) == 1
    chosen = knnfast.build_info()["cpu_plans_chosen"]
    assert len(chosen) == 1 and set(chosen.values()) <= set(PLANS)
    (key, plan), = chosen.items()
    assert "|B64|k8|" in key and str(key_dtype).replace("torch.", "") in key
    entry = json.loads(plan_cache.read_text())["choices"][key]
    assert entry["plan"] == plan and set(entry["times_ms"]) == set(PLANS)
    # another process (simulated: memory forgotten) reads the file instead of measuring
    plan_choice.forget_choices()
    knnfast.knn_search(q, keys, 8, "l2")
    assert len(calibrations) == 1
    knnfast.knn_search(q[:3], keys, 8, "l2")  # a new B bucket is measured
    assert len(calibrations) == 2


@pytest.mark.parametrize("metric", METRICS)
def test_auto_result_equals_every_forced_plan(plan_cache, metric):
    q, keys = _search_data(N=2000, dtype=torch.float16)
    exclude = torch.randint(-1, 2000, (48,))
    rs, ri = ref.knn_search(q, keys.float(), 16, metric, exclude=exclude)
    for plan in ["auto"] + PLANS:
        s, i = knnfast.knn_search(q, keys, 16, metric, exclude=exclude, plan=plan)
        assert_topk_parity(s, i, rs, ri, q, keys, metric)
    assert len(knnfast.build_info()["cpu_plans_chosen"]) == 1


def test_auto_stream_not_timed_for_large_batches():
    assert "stream" in plan_choice.eligible_plans(plan_choice.STREAM_MAX_BATCH)
    assert "stream" not in plan_choice.eligible_plans(plan_choice.STREAM_MAX_BATCH + 1)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 99, "choices": {}}',
                                     '{"version": 1, "choices": 3}'])
def test_auto_corrupt_cache_is_ignored_with_a_warning(plan_cache, calibrations, content):
    plan_cache.write_text(content)
    q, keys = _search_data()
    with pytest.warns(RuntimeWarning, match="ignoring the knn_search plan cache"):
        s, i = knnfast.knn_search(q, keys, 8, "ip")
    assert_topk_valid(s, i, q, keys, 8, "ip")
    assert len(calibrations) == 1
    assert json.loads(plan_cache.read_text())["version"] == plan_choice.CACHE_VERSION  # rewritten


def test_auto_cached_plan_this_cpu_cannot_run_is_measured_again(plan_cache, calibrations):
    q, keys = _search_data()
    key = plan_choice.bucket_key(q, keys, 8)
    plan_cache.write_text(json.dumps({"version": 1, "choices": {key: {"plan": "warp_drive"}}}))
    knnfast.knn_search(q, keys, 8, "l2")
    assert len(calibrations) == 1
    assert knnfast.build_info()["cpu_plans_chosen"][key] in PLANS


def test_auto_unwritable_cache_keeps_the_choice_in_memory(plan_cache, calibrations, monkeypatch):
    blocker = plan_cache.parent / "file"
    blocker.write_text("")
    monkeypatch.setenv(plan_choice.CACHE_VARIABLE, str(blocker / "plans.json"))
    q, keys = _search_data()
    with pytest.warns(RuntimeWarning, match="cannot write the knn_search plan cache"):
        knnfast.knn_search(q, keys, 8, "l2")
    knnfast.knn_search(q, keys, 8, "l2")
    assert len(calibrations) == 1


def test_auto_calibration_off_keeps_the_fixed_rule(plan_cache, calibrations):
    q, keys = _search_data()
    with plan_choice.calibration(False):
        s, i = knnfast.knn_search(q, keys, 8, "l2")
    assert calibrations == [] and not plan_cache.exists()
    assert knnfast.build_info()["cpu_plans_chosen"] == {}
    assert_topk_valid(s, i, q, keys, 8, "l2")


def test_auto_small_searches_keep_the_fixed_rule(plan_cache, calibrations, monkeypatch):
    monkeypatch.setattr(plan_choice, "MIN_WORK", 1 << 27)
    q, keys = _search_data()
    assert plan_choice.choose(q, keys, 8, "l2") == "auto"
    assert calibrations == []


def test_auto_never_measures_under_torch_compile(plan_cache, monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("calibration ran while tracing")
    monkeypatch.setattr(plan_choice, "calibrate", fail)
    torch._dynamo.reset()
    q, keys = _search_data()
    step = torch.compile(lambda q, k: knnfast.knn_search(q, k, 8, "l2"), fullgraph=True,
                         backend="aot_eager")
    s, i = step(q, keys)
    assert_topk_valid(s, i, q, keys, 8, "l2")
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # fake tensors: nothing to time
        assert plan_choice.choose(torch.empty(48, 40), torch.empty(3000, 40), 8, "l2") == "auto"


def test_bucket_rounds_up_to_powers_of_two():
    assert [plan_choice.bucket(n) for n in (1, 2, 3, 16, 17, 640, 1024)] == \
        [1, 2, 4, 16, 32, 1024, 1024]


def test_build_info_names_the_cpu_and_its_isa():
    info = knnfast.build_info()
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert set(info["isa"]) <= {"avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16",
                                "amx_tile", "amx_bf16", "amx_fp16"}
    assert ("avx512_bf16" in info["isa"]) == info["avx512_bf16"]
    assert "bf16_gemm" in info["cpu_plans"]  # runs on every CPU


def test_calibration_times_past_the_start_of_a_scan(plan_cache, monkeypatch):
    """Plans are timed on 32,768 keys (512 k for large k, all of a smaller store) and the
    fastest there is kept: smaller samples ranked plans by their start-up costs (see
    plan_choice.sample_size)."""
    cost = {"stream": (400.0, 0.001), "gemm_f32": (1.0, 0.01)}   # ms: fixed, per key
    monkeypatch.setattr(plan_choice, "eligible_plans", lambda batch: tuple(cost))
    seen = []

    def fake_time(queries, keys, k, metric, plan):
        seen.append(keys.shape[0])
        fixed, per_key = cost[plan]
        return fixed + per_key * keys.shape[0]
    monkeypatch.setattr(plan_choice, "time_plan", fake_time)
    q = torch.randn(4, 8)
    plan, times = plan_choice.calibrate(q, torch.randn(100_000, 8), 8, "l2")
    assert set(seen) == {32768} and plan == "gemm_f32"
    assert times == {"stream": pytest.approx(400 + 32.768), "gemm_f32": pytest.approx(328.68)}
    seen.clear()
    plan_choice.calibrate(q, torch.randn(100_000, 8), 128, "l2")
    assert set(seen) == {512 * 128}
    seen.clear()
    plan_choice.calibrate(q, torch.randn(5000, 8), 8, "l2")
    assert set(seen) == {5000}


def test_bucket_key_names_the_datastore_size():
    q = torch.randn(3, 8)
    small, large = (plan_choice.bucket_key(q, torch.empty(n, 8), 4) for n in (1000, 100_000))
    assert "|N1024|" in small and "|N131072|" in large
