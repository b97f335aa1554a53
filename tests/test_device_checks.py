"""Device mismatches raise ValueError naming the argument, checked without a GPU: a tensor on
the `meta` device stands in for "another device" (the CUDA variants of these tests run where
a GPU exists)."""
import pytest
import torch

import knnfast


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def test_knn_search_keys_on_other_device():
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="keys is on meta"):
        knnfast.knn_search(q, _meta(keys), 3)
    with pytest.raises(ValueError, match="exclude is on meta"):
        knnfast.knn_search(q, keys, 3, exclude=_meta(torch.zeros(2, dtype=torch.long)))


def test_knn_rescore_indices_on_other_device():
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="indices is on meta"):
        knnfast.knn_rescore(q, keys, _meta(torch.zeros(2, 3, dtype=torch.long)))


def test_interpolate_and_gold_arguments_on_other_device():
    logits = torch.randn(2, 7)
    tokens = torch.randint(0, 7, (2, 3))
    scores = torch.randn(2, 3)
    with pytest.raises(ValueError, match="tokens is on meta"):
        knnfast.knn_interpolate(logits, _meta(tokens), scores=scores)
    with pytest.raises(ValueError, match="scores is on meta"):
        knnfast.knn_gold_logprob(logits, tokens[:, 0], tokens, scores=_meta(scores))
    with pytest.raises(ValueError, match="lam is on meta"):
        knnfast.knn_interpolate(logits, tokens, scores=scores, lam=_meta(torch.rand(2)))
    with pytest.raises(ValueError, match="temperature is on meta"):
        knnfast.knn_probs(scores, tokens, 7, temperature=_meta(torch.rand(2)))
