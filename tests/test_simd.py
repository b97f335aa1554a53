"""The portable (non-AVX-512) bodies of the vectorized CPU row kernels against the AVX-512
ones, for knn_interpolate, knn_gold_logprob, knn_search and knn_rescore at once.

The kernels pick AVX-512 or a portable body once per process, at load time, from
KNNFAST_SIMD: hence a subprocess per level. (The per-op forced kernel paths live in the
"FORCED KERNEL PATHS" block of each tests/test_<op>.py.)

FORCED KERNEL PATH (environment variable): test_portable_kernels_match_avx512 sets
KNNFAST_SIMD in the subprocess's environment.
"""
import pytest
import torch

import knnfast
from helpers import run_simd_script


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
    return run_simd_script(_SIMD_SCRIPT, level)


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
