"""Every CPU kernel path, forced one at a time, against the exact answer.

knn_search picks its path from the batch size and the CPU (stream / gemm_f32 / bf16); the
vectorized row kernels pick AVX-512 or a portable body at load time. The ordinary tests
only see the paths this machine picks, so here each one is forced:
KNNFAST_SEARCH_PATH is read per call, KNNFAST_SIMD once per process (hence a subprocess).
"""
import json
import re
import os
import subprocess
import sys

import pytest
import torch

import knnfast
from knnfast import reference as ref
from helpers import KEY_DTYPES, METRICS, assert_topk_valid

SEARCH_PATHS = ["stream", "gemm_f32"] + (["bf16"] if knnfast.build_info()["avx512_bf16"] else [])


@pytest.fixture
def search_path(request, monkeypatch):
    monkeypatch.setenv("KNNFAST_SEARCH_PATH", request.param)
    return request.param


def _clustered(B, N, D, dtype, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, D, generator=g) + offset
    keys = centres[torch.randint(0, 16, (N,), generator=g)] + 0.5 * torch.randn(N, D, generator=g)
    queries = centres[torch.randint(0, 16, (B,), generator=g)] + 0.5 * torch.randn(B, D, generator=g)
    return queries, keys.to(dtype)


@pytest.mark.parametrize("search_path", SEARCH_PATHS, indirect=True)
@pytest.mark.parametrize("B,N,D,k", [(3, 700, 33, 5), (40, 4500, 64, 16), (33, 300, 7, 300)])
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_forced_search_path_is_exact(search_path, B, N, D, k, key_dtype, metric):
    """Tiles span several blocks (N > tile), D is odd for the bf16 pair packing, and k = N
    makes every key a candidate; each path must return the exact top-k."""
    q, keys = _clustered(B, N, D, key_dtype, offset=0.0)
    exclude = torch.randint(-1, N, (B,))
    s, i = knnfast.knn_search(q, keys, k, metric, exclude=exclude)
    assert_topk_valid(s, i, q, keys, k, metric, exclude=exclude)
    rs, ri = ref.knn_search(q, keys, k, metric, exclude=exclude)
    torch.testing.assert_close(s, rs, rtol=1e-4, atol=1e-3 * float(rs[rs.isfinite()].abs().max()))


@pytest.mark.parametrize("search_path", SEARCH_PATHS, indirect=True)
@pytest.mark.parametrize("metric", METRICS)
def test_forced_search_path_key_sq_norms(search_path, metric):
    q, keys = _clustered(36, 900, 48, torch.float16, offset=1.0)
    norms = keys.float().pow(2).sum(1)
    s, i = knnfast.knn_search(q, keys, 9, metric, key_sq_norms=norms)
    assert_topk_valid(s, i, q, keys, 9, metric)


@pytest.mark.skipif("bf16" not in SEARCH_PATHS, reason="CPU has no AVX512-BF16")
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("offset", [10.0, 30.0])
def test_bf16_path_exact_with_large_common_component(monkeypatch, capfd, metric, offset):
    """Real hidden states share a large common component; bf16 rounding alone would lose the
    ranking there. The bounds must keep every true neighbour as a candidate."""
    monkeypatch.setenv("KNNFAST_SEARCH_PATH", "bf16")
    monkeypatch.setenv("KNNFAST_DEBUG", "1")
    g = torch.Generator().manual_seed(1)
    keys = (torch.randn(3000, 256, generator=g) + offset).to(torch.bfloat16)
    q = torch.randn(40, 256, generator=g) + offset
    s, i = knnfast.knn_search(q, keys, 8, metric)
    assert_topk_valid(s, i, q, keys, 8, metric)
    assert "candidates rescored per row" in capfd.readouterr().err


@pytest.mark.skipif("bf16" not in SEARCH_PATHS, reason="CPU has no AVX512-BF16")
def test_bf16_path_rescans_rows_over_the_candidate_cap(monkeypatch, capfd):
    """140,000 keys whose cosines to the query all agree within the bf16 error bound: every
    key stays a candidate, the cap (65,536 per row and thread) is exceeded, and the rows must
    be searched again exactly instead of being cut short."""
    monkeypatch.setenv("KNNFAST_SEARCH_PATH", "bf16")
    monkeypatch.setenv("KNNFAST_DEBUG", "1")
    g = torch.Generator().manual_seed(2)
    keys = 1000.0 + 1e-3 * torch.randn(140_000, 16, generator=g)
    q = 1000.0 + 1e-3 * torch.randn(2, 16, generator=g)
    s, i = knnfast.knn_search(q, keys, 5, "cos")
    assert_topk_valid(s, i, q, keys, 5, "cos")
    over_cap = re.search(r"(\d+) rows over the candidate cap", capfd.readouterr().err)
    assert over_cap and int(over_cap.group(1)) == 2


_SIMD_SCRIPT = r"""
import json, sys, torch, knnfast
torch.manual_seed(0)
logits = torch.randn(7, 3001) * 4
tokens = torch.randint(-1, 3001, (7, 9))
scores = -torch.rand(7, 9) * 20
targets = torch.randint(0, 3001, (7,))
keys = torch.randn(500, 37).half()
q = torch.randn(5, 37)
out = {
    "simd": knnfast.build_info()["simd"],
    "interp": knnfast.knn_interpolate(logits, tokens, scores=scores, temperature=2.0, lam=0.3).tolist(),
    "gold": knnfast.knn_gold_logprob(logits, targets, tokens, scores=scores, lam=0.3).tolist(),
    "search": [t.tolist() for t in knnfast.knn_search(q, keys, 6, "l2")],
    "rescore": knnfast.knn_rescore(q, keys, torch.randint(-1, 500, (5, 4)), "cos").tolist(),
}
json.dump(out, sys.stdout)
"""


def _run_simd(level):
    env = dict(os.environ, KNNFAST_SIMD=level)
    proc = subprocess.run([sys.executable, "-c", _SIMD_SCRIPT], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)


@pytest.mark.skipif(knnfast.build_info()["simd"] != "avx512", reason="CPU has no AVX-512")
def test_portable_kernels_match_avx512():
    fast, portable = _run_simd("auto"), _run_simd("generic")
    assert fast["simd"] == "avx512" and portable["simd"] == "generic"
    for key in ("interp", "gold", "rescore"):
        torch.testing.assert_close(torch.tensor(portable[key]), torch.tensor(fast[key]),
                                   rtol=1e-5, atol=1e-4)
    assert portable["search"][1] == fast["search"][1]
    torch.testing.assert_close(torch.tensor(portable["search"][0]),
                               torch.tensor(fast["search"][0]), rtol=1e-5, atol=1e-4)
