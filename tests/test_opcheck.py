"""torch.library.opcheck on every raw op (torch.ops.knnfast.<op>).

The raw ops take exactly what the Python wrappers in knnfast/ops.py pass: see
the schemas in csrc/ops.cpp. temperature / lam are float32 tensors with one
element (a Python float in the wrapper) or B elements (per row); optional
tensors may be None.
"""
import pytest
import torch

import knnfast  # noqa: F401  (loads the extension and registers fake impls)
from conftest import DEVICES

NEG_INF = float("-inf")


def _scalar(x, device):
    return torch.tensor([x], dtype=torch.float32, device=device)


def _samples_search(device):
    B, N, D = 5, 70, 8
    q = torch.randn(B, D, device=device)
    keys = torch.randn(N, D, device=device)
    keys_h = keys.half()
    keys_b = keys.bfloat16()
    norms = keys.pow(2).sum(1)
    ex = torch.tensor([0, -1, 3, 69, -1], device=device)
    q40 = torch.randn(40, D, device=device)
    return [
        (q, keys, 4, "l2", None, None),
        (q, keys, 4, "ip", norms, ex),
        (q, keys, 100, "cos", None, ex),
        (q.half(), keys_h, 3, "l2", norms, None),
        (q, keys_b, 7, "cos", None, None),
        (q40, keys_h, 8, "l2", None, None),
        (q40.bfloat16(), keys_b, 8, "ip", None, None),
    ]


def _samples_rescore(device):
    q = torch.randn(4, 6, device=device)
    keys = torch.randn(30, 6, device=device)
    idx = torch.randint(-1, 30, (4, 5), device=device)
    return [(q, keys, idx, "l2"), (q, keys.half(), idx, "ip"), (q.bfloat16(), keys, idx, "cos")]


def _tok_scores(B, k, V, device):
    tok = torch.randint(-1, V, (B, k), device=device)
    sc = torch.randn(B, k, device=device).masked_fill(tok < 0, NEG_INF)
    return tok, sc


def _samples_probs(device):
    tok, sc = _tok_scores(4, 6, 11, device)
    return [(sc, tok, 11, _scalar(1.0, device)),
            (sc, tok, 11, torch.rand(4, device=device) + 0.1)]


def _samples_probs_sparse(device):
    tok, sc = _tok_scores(4, 6, 5, device)
    return [(sc, tok, _scalar(0.5, device)), (sc, tok, torch.rand(4, device=device) + 0.1)]


def _samples_interpolate(device):
    B, V, k = 4, 13, 6
    logits = torch.randn(B, V, device=device)
    tok, sc = _tok_scores(B, k, V, device)
    w = torch.rand(B, k, device=device)
    return [
        (logits, tok, sc, None, _scalar(1.0, device), _scalar(0.5, device)),
        (logits, tok, None, w, _scalar(1.0, device), torch.rand(B, device=device)),
        (logits.half(), tok, sc, None, torch.rand(B, device=device) + 0.1, _scalar(1.0, device)),
        (logits.bfloat16(), tok, sc, None, _scalar(2.0, device), _scalar(0.0, device)),
        # differentiable inputs: opcheck then also checks the autograd registration
        (logits.clone().requires_grad_(), tok, sc.clone().requires_grad_(), None,
         (torch.rand(B, device=device) + 0.5).requires_grad_(),
         (torch.rand(B, device=device) * 0.8 + 0.1).requires_grad_()),
        (logits.clone().requires_grad_(), tok, None, w.clone().requires_grad_(),
         _scalar(1.0, device), _scalar(0.3, device).requires_grad_()),
    ]


def _samples_gold(device):
    B, V, k = 4, 13, 6
    logits = torch.randn(B, V, device=device)
    tok, sc = _tok_scores(B, k, V, device)
    targets = torch.tensor([0, 12, -100, 3], device=device)
    w = torch.rand(B, k, device=device)
    return [
        (logits, targets, tok, sc, None, _scalar(1.0, device), _scalar(0.5, device), -100),
        (logits, targets, tok, None, w, _scalar(1.0, device), torch.rand(B, device=device), -100),
        (logits.half(), targets, tok, sc, None, torch.rand(B, device=device) + 0.1, _scalar(1.0, device), -100),
        (logits.clone().requires_grad_(), targets, tok, sc.clone().requires_grad_(), None,
         (torch.rand(B, device=device) + 0.5).requires_grad_(),
         (torch.rand(B, device=device) * 0.8 + 0.1).requires_grad_(), -100),
    ]


def _samples_label_counts(device):
    return [(torch.randint(-1, 5, (4, 9), device=device),), (torch.tensor([[0, 0, -1, 3]], device=device),)]


SAMPLES = {
    "knn_search": _samples_search,
    "knn_rescore": _samples_rescore,
    "knn_probs": _samples_probs,
    "knn_probs_sparse": _samples_probs_sparse,
    "knn_interpolate": _samples_interpolate,
    "knn_gold_logprob": _samples_gold,
    "label_counts": _samples_label_counts,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SAMPLES))
def test_opcheck(device, name):
    op = getattr(torch.ops.knnfast, name).default  # an OpOverload: knn_interpolate also has .out
    for args in SAMPLES[name](device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_interpolate_out(device):
    op = torch.ops.knnfast.knn_interpolate.out
    for args in _samples_interpolate(device):
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            continue  # out= is inference-only
        out = torch.empty(args[0].shape, dtype=torch.float32, device=device)
        torch.library.opcheck(op, args, {"out": out})
