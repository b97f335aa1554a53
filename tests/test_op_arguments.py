"""One table of accepted and rejected arguments, fed to every op and to its pure-PyTorch twin:
``knnfast.reference`` must accept exactly what ``knnfast.ops`` accepts (issue 11), and a
rejected call must raise ValueError naming the same argument in both.

Each case is (op, change, expected): ``change`` edits the valid base call of that op;
``expected`` is None (accepted) or the argument name both messages must contain.
"""
import pytest
import torch

import knnfast
import knnfast.reference as ref
from knnfast.defaults import MAX_K

B, V, K, D, N = 3, 10, 4, 8, 20
NAN, INF = float("nan"), float("inf")


def base_call(op):
    """(args, kwargs) of a valid call of `op` (fresh tensors each time)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g)
    tokens = torch.tensor([[1, 2, 2, -1], [0, 9, 3, 4], [-1, -1, -1, -1]])
    scores = torch.randn(B, K, generator=g)
    targets = torch.tensor([1, 9, -100])
    if op == "knn_search":
        return [torch.randn(B, D, generator=g), torch.randn(N, D, generator=g), K], {}
    if op == "knn_search_lists":
        return [torch.randn(B, D, generator=g), torch.randn(N, D, generator=g),
                torch.tensor([0, 5, 5, 12, N]), torch.tensor([[0, 2], [3, -1], [1, 1]]), K], {}
    if op == "knn_rescore":
        return [torch.randn(B, D, generator=g), torch.randn(N, D, generator=g),
                torch.tensor([[0, 5, -1, 19]] * B)], {}
    if op == "knn_probs":
        return [scores, tokens, V], {}
    if op == "knn_probs_sparse":
        return [scores, tokens], {}
    if op == "knn_interpolate":
        return [logits, tokens], {"scores": scores}
    if op == "knn_gold_logprob":
        return [logits, targets, tokens], {"scores": scores}
    if op == "label_counts":
        return [tokens], {}
    if op == "knn_kd_loss":
        return [logits, targets, tokens, scores], {}
    if op == "softmax_stats":
        return [logits, 2], {}
    if op == "knn_kd_linear_loss":
        return [torch.randn(B, D, generator=g), torch.randn(V, D, generator=g), targets, tokens,
                scores], {"bias": torch.randn(V, generator=g)}
    raise KeyError(op)


def edit(position_or_name, value):
    """A change that replaces positional argument i or keyword `name` (None deletes it)."""
    def change(a, kw):
        if isinstance(position_or_name, int):
            a[position_or_name] = value(a) if callable(value) else value
        elif value is None:
            kw.pop(position_or_name, None)
        else:
            kw[position_or_name] = value(a) if callable(value) else value
    return change


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


NEIGHBOUR_OPS = ("knn_probs", "knn_probs_sparse", "knn_interpolate", "knn_gold_logprob")
MIXTURE_OPS = ("knn_interpolate", "knn_gold_logprob")

CASES = [
    # knn_search
    ("knn_search", "valid", edit(2, K), None),
    ("knn_search", "k=MAX_K", edit(2, MAX_K), None),
    ("knn_search", "k=0", edit(2, 0), "k"),
    ("knn_search", "k>MAX_K", edit(2, MAX_K + 1), "k"),
    ("knn_search", "k=True", edit(2, True), "k"),
    ("knn_search", "k=2.0", edit(2, 2.0), "k"),
    ("knn_search", "metric", edit("metric", "dot"), "metric"),
    ("knn_search", "metric cos", edit("metric", "cos"), None),
    ("knn_search", "queries 1-D", edit(0, lambda a: a[0][0]), "queries"),
    ("knn_search", "queries int", edit(0, lambda a: a[0].long()), "queries"),
    ("knn_search", "queries NaN", edit(0, lambda a: a[0].index_fill(1, torch.tensor([0]), NAN)), "queries"),
    ("knn_search", "queries fp16", edit(0, lambda a: a[0].half()), None),
    ("knn_search", "keys bf16", edit(1, lambda a: a[1].bfloat16()), None),
    ("knn_search", "keys D", edit(1, lambda a: a[1][:, :3]), "D"),
    ("knn_search", "keys N=0", edit(1, lambda a: a[1][:0]), "keys"),
    ("knn_search", "keys not a tensor", edit(1, [[1.0] * D]), "keys"),
    ("knn_search", "norms shape", edit("key_sq_norms", torch.ones(N + 1)), "key_sq_norms"),
    ("knn_search", "norms float64", edit("key_sq_norms", lambda a: (a[1] ** 2).sum(1).double()), None),
    ("knn_search", "exclude shape", edit("exclude", torch.zeros(B + 1, dtype=torch.long)), "exclude"),
    ("knn_search", "exclude range", edit("exclude", torch.tensor([0, N, -1])), "exclude"),
    ("knn_search", "exclude -2", edit("exclude", torch.tensor([0, -2, -1])), "exclude"),
    ("knn_search", "exclude int32", edit("exclude", torch.tensor([0, 1, -1], dtype=torch.int32)), None),
    ("knn_search", "exclude float", edit("exclude", torch.tensor([0.0, 1.0, -1.0])), "exclude"),
    # knn_search_lists
    ("knn_search_lists", "valid", edit(4, K), None),
    ("knn_search_lists", "k=0", edit(4, 0), "k"),
    ("knn_search_lists", "k=True", edit(4, True), "k"),
    ("knn_search_lists", "metric", edit("metric", "dot"), "metric"),
    ("knn_search_lists", "metric ip", edit("metric", "ip"), None),
    ("knn_search_lists", "queries 1-D", edit(0, lambda a: a[0][0]), "queries"),
    ("knn_search_lists", "queries NaN", edit(0, lambda a: a[0].index_fill(1, torch.tensor([0]), NAN)), "queries"),
    ("knn_search_lists", "keys D", edit(1, lambda a: a[1][:, :2]), "D"),
    ("knn_search_lists", "keys N=0", edit(1, lambda a: a[1][:0]), "keys"),
    ("knn_search_lists", "offsets float", edit(2, t(0, 5, 5, 12, N)), "list_offsets"),
    ("knn_search_lists", "offsets 2-D", edit(2, torch.tensor([[0, N]])), "list_offsets"),
    ("knn_search_lists", "offsets L=0", edit(2, torch.tensor([0])), "list_offsets"),
    ("knn_search_lists", "offsets start", edit(2, torch.tensor([1, 5, 5, 12, N])), "list_offsets"),
    ("knn_search_lists", "offsets decrease", edit(2, torch.tensor([0, 5, 4, 12, N])), "list_offsets"),
    ("knn_search_lists", "offsets end", edit(2, torch.tensor([0, 5, 5, 12, N - 1])), "list_offsets"),
    ("knn_search_lists", "offsets past N", edit(2, torch.tensor([0, 5, N + 1, 12, N])), "list_offsets"),
    ("knn_search_lists", "offsets int32", edit(2, torch.tensor([0, 5, 5, 12, N], dtype=torch.int32)), None),
    ("knn_search_lists", "probes range", edit(3, torch.tensor([[0, 4], [3, -1], [1, 1]])), "probes"),
    ("knn_search_lists", "probes -2", edit(3, torch.tensor([[0, -2], [3, -1], [1, 1]])), "probes"),
    ("knn_search_lists", "probes rows", edit(3, torch.tensor([[0, 1]] * (B + 1))), "probes"),
    ("knn_search_lists", "probes P=0", edit(3, torch.zeros(B, 0, dtype=torch.long)), "probes"),
    ("knn_search_lists", "probes float", edit(3, torch.zeros(B, 2)), "probes"),
    ("knn_search_lists", "probes int32", edit(3, torch.zeros(B, 2, dtype=torch.int32)), None),
    ("knn_search_lists", "exclude range", edit("exclude", torch.tensor([0, N, -1])), "exclude"),
    ("knn_search_lists", "exclude shape", edit("exclude", torch.tensor([0, 1])), "exclude"),
    ("knn_search_lists", "exclude float", edit("exclude", t(0, 1, 2)), "exclude"),
    ("knn_search_lists", "exclude list", edit("exclude", [0, 1, 2]), "exclude"),
    ("knn_search_lists", "probes bool", edit(3, torch.zeros(B, 2, dtype=torch.bool)), "probes"),
    ("knn_search_lists", "exclude valid", edit("exclude", torch.tensor([0, 19, -1])), None),
    # knn_rescore
    ("knn_rescore", "valid", edit("metric", "ip"), None),
    ("knn_rescore", "indices range", edit(2, torch.tensor([[0, N, -1, 1]] * B)), "indices"),
    ("knn_rescore", "indices -2", edit(2, torch.tensor([[0, -2, -1, 1]] * B)), "indices"),
    ("knn_rescore", "indices rows", edit(2, torch.tensor([[0, 1, -1, 1]] * (B + 1))), "indices"),
    ("knn_rescore", "indices float", edit(2, torch.zeros(B, K)), "indices"),
    ("knn_rescore", "indices int32", edit(2, torch.zeros(B, K, dtype=torch.int32)), None),
    ("knn_rescore", "queries inf", edit(0, lambda a: a[0].index_fill(1, torch.tensor([1]), INF)), "queries"),
    ("knn_rescore", "keys D", edit(1, lambda a: a[1][:, :2]), "D"),
    ("knn_rescore", "metric", edit("metric", "L2"), "metric"),
    # label_counts
    ("label_counts", "valid", edit(0, lambda a: a[0]), None),
    ("label_counts", "int32", edit(0, lambda a: a[0].int()), None),
    ("label_counts", "float", edit(0, lambda a: a[0].float()), "tokens"),
    ("label_counts", "1-D", edit(0, lambda a: a[0][0]), "tokens"),
    ("label_counts", "-2", edit(0, torch.tensor([[1, -2]])), "tokens"),
    ("label_counts", "large ids", edit(0, torch.tensor([[10 ** 9, 3]])), None),
    # softmax_stats
    ("softmax_stats", "valid", edit(1, 2), None),
    ("softmax_stats", "top=V", edit(1, V), None),
    ("softmax_stats", "top=V+1", edit(1, V + 1), "top"),
    ("softmax_stats", "top=0", edit(1, 0), "top"),
    ("softmax_stats", "top=True", edit(1, True), "top"),
    ("softmax_stats", "logits -inf", edit(0, lambda a: a[0].index_fill(1, torch.tensor([2]), -INF)), None),
    ("softmax_stats", "logits row -inf", edit(0, lambda a: a[0].index_fill(0, torch.tensor([1]), -INF)), None),
    ("softmax_stats", "logits NaN", edit(0, lambda a: a[0].index_fill(1, torch.tensor([2]), NAN)), "logits"),
    ("softmax_stats", "logits +inf", edit(0, lambda a: a[0].index_fill(1, torch.tensor([2]), INF)), "logits"),
    ("softmax_stats", "logits bf16", edit(0, lambda a: a[0].bfloat16()), None),
    ("softmax_stats", "logits int", edit(0, lambda a: a[0].long()), "logits"),
    ("softmax_stats", "logits 1-D", edit(0, lambda a: a[0][0]), "logits"),
    # knn_probs
    ("knn_probs", "vocab_size=0", edit(2, 0), "vocab_size"),
    ("knn_probs", "vocab_size=2.0", edit(2, 2.0), "vocab_size"),
    ("knn_probs", "vocab_size small", edit(2, 5), "tokens"),
    ("knn_kd_loss", "valid", edit("reduction", "sum"), None),
]

for _op in NEIGHBOUR_OPS:
    _t = 1 if _op in ("knn_probs", "knn_probs_sparse") else (2 if _op == "knn_gold_logprob" else 1)
    _s = 0 if _op in ("knn_probs", "knn_probs_sparse") else "scores"
    CASES += [
        (_op, "valid", edit(_t, lambda a, i=_t: a[i]), None),
        (_op, "tokens int32", edit(_t, lambda a, i=_t: a[i].int()), None),
        (_op, "tokens float", edit(_t, lambda a, i=_t: a[i].float()), "tokens"),
        (_op, "tokens -2", edit(_t, lambda a, i=_t: a[i].clone().fill_(-2)), "tokens"),
        (_op, "tokens rows", edit(_t, lambda a, i=_t: a[i][:2]), "tokens"),
        (_op, "scores NaN", edit(_s, lambda a: torch.full((B, K), NAN)), "scores"),
        (_op, "scores +inf", edit(_s, lambda a: torch.full((B, K), INF)), "scores"),
        (_op, "scores -inf", edit(_s, lambda a: torch.full((B, K), -INF)), None),
        (_op, "scores fp16", edit(_s, lambda a: torch.randn(B, K).half()), None),
        (_op, "scores float64", edit(_s, lambda a: torch.randn(B, K).double()), None),
        (_op, "scores int", edit(_s, lambda a: torch.zeros(B, K, dtype=torch.long)), "scores"),
        (_op, "scores k", edit(_s, lambda a: torch.randn(B, K - 1)), "scores"),
        (_op, "temperature 0", edit("temperature", 0.0), "temperature"),
        (_op, "temperature inf", edit("temperature", INF), "temperature"),
        (_op, "temperature [B]", edit("temperature", t(1.0, 2.0, 10.0)), None),
        (_op, "temperature [1]", edit("temperature", t(5.0)), None),
        (_op, "temperature 0-d", edit("temperature", torch.tensor(5.0)), None),
        (_op, "temperature float64", edit("temperature", t(1.0, 2.0, 3.0, dtype=torch.float64)), None),
        (_op, "temperature [B] bad", edit("temperature", t(1.0, -2.0, 10.0)), "temperature"),
        (_op, "temperature [B+1]", edit("temperature", t(1.0, 1.0, 1.0, 1.0)), "temperature"),
        (_op, "temperature str", edit("temperature", "1"), "temperature"),
        (_op, "temperature bool", edit("temperature", True), "temperature"),
    ]
for _op in MIXTURE_OPS:
    CASES += [
        (_op, "weights", lambda a, kw: (kw.pop("scores"), kw.update(weights=torch.rand(B, K))), None),
        (_op, "weights negative", lambda a, kw: (kw.pop("scores"), kw.update(weights=-torch.rand(B, K))), "weights"),
        (_op, "weights NaN", lambda a, kw: (kw.pop("scores"), kw.update(weights=torch.full((B, K), NAN))), "weights"),
        (_op, "both", edit("weights", torch.rand(B, K)), "weights"),
        (_op, "neither", edit("scores", None), "weights"),
        (_op, "lam 0", edit("lam", 0.0), None),
        (_op, "lam 1", edit("lam", 1), None),
        (_op, "lam 1.5", edit("lam", 1.5), "lam"),
        (_op, "lam [B]", edit("lam", t(0.1, 0.5, 0.9)), None),
        (_op, "lam [1]", edit("lam", t(0.3)), None),
        (_op, "lam [B] bad", edit("lam", t(0.1, 1.5, 0.9)), "lam"),
        (_op, "lam [2]", edit("lam", t(0.1, 0.5)), "lam"),
        (_op, "logits NaN", edit(0, lambda a: a[0].index_fill(1, torch.tensor([2]), NAN)), "logits"),
        (_op, "logits +inf", edit(0, lambda a: a[0].index_fill(1, torch.tensor([2]), INF)), "logits"),
        (_op, "logits -inf", edit(0, lambda a: a[0].index_fill(1, torch.tensor([2]), -INF)), None),
        (_op, "logits float64", edit(0, lambda a: a[0].double()), None),
        (_op, "logits bf16", edit(0, lambda a: a[0].bfloat16()), None),
        (_op, "logits int", edit(0, lambda a: a[0].long()), "logits"),
        (_op, "logits 1-D", edit(0, lambda a: a[0][0]), "logits"),
        (_op, "tokens >= V", edit(1 if _op == "knn_interpolate" else 2,
                                  lambda a, i=(1 if _op == "knn_interpolate" else 2): a[i].clone().fill_(V)), "tokens"),
    ]
for _op in ("knn_gold_logprob", "knn_kd_loss"):
    CASES += [
        (_op, "targets ignored", edit(1, torch.tensor([-100, -100, -100])), None),
        (_op, "targets >= V", edit(1, torch.tensor([1, V, 0])), "targets"),
        (_op, "targets -1", edit(1, torch.tensor([1, -1, 0])), "targets"),
        (_op, "targets rows", edit(1, torch.tensor([1, 2])), "targets"),
        (_op, "targets float", edit(1, torch.tensor([1.0, 2.0, 0.0])), "targets"),
        (_op, "targets int32", edit(1, torch.tensor([1, 2, 0], dtype=torch.int32)), None),
        (_op, "ignore_index", lambda a, kw: (a.__setitem__(1, torch.tensor([1, 2, 7])),
                                             kw.update(ignore_index=7)), None),
    ]
CASES += [
    ("knn_kd_loss", "teacher_probs", lambda a, kw: (a.pop(3), kw.update(teacher_probs=torch.rand(B, K))), None),
    ("knn_kd_loss", "teacher_probs negative", lambda a, kw: (a.pop(3), kw.update(teacher_probs=-torch.rand(B, K))), "teacher_probs"),
    ("knn_kd_loss", "both teachers", edit("teacher_probs", torch.rand(B, K)), "teacher_probs"),
    ("knn_kd_loss", "no teacher", lambda a, kw: a.pop(3), "teacher_probs"),
    ("knn_kd_loss", "teacher_tokens >= V", edit(2, lambda a: a[2].clone().fill_(V)), "teacher_tokens"),
    ("knn_kd_loss", "teacher_scores shape", edit(3, torch.randn(B, K + 1)), "teacher_scores"),
    ("knn_kd_loss", "teacher_scores NaN", edit(3, torch.full((B, K), NAN)), "teacher_scores"),
    ("knn_kd_loss", "temperature 0", edit("temperature", 0.0), "temperature"),
    ("knn_kd_loss", "temperature [B]", edit("temperature", t(1.0, 2.0, 3.0)), None),
    ("knn_kd_loss", "ce_weight -1", edit("ce_weight", -1.0), "ce_weight"),
    ("knn_kd_loss", "kd_weight inf", edit("kd_weight", INF), "kd_weight"),
    ("knn_kd_loss", "label_smoothing 1", edit("label_smoothing", 1.0), "label_smoothing"),
    ("knn_kd_loss", "label_smoothing 0.1", edit("label_smoothing", 0.1), None),
    ("knn_kd_loss", "reduction", edit("reduction", "avg"), "reduction"),
    ("knn_kd_loss", "reduction none", edit("reduction", "none"), None),
    ("knn_kd_loss", "kd", edit("kd", "js"), "kd"),
    ("knn_kd_loss", "kd kl", edit("kd", "kl"), None),
    ("knn_kd_loss", "logits NaN", edit(0, lambda a: a[0].index_fill(1, torch.tensor([2]), NAN)), "logits"),
    ("knn_kd_loss", "logits float64", edit(0, lambda a: a[0].double()), None),
]
_LIN = "knn_kd_linear_loss"
CASES += [
    (_LIN, "valid", edit("reduction", "none"), None),
    (_LIN, "no bias", edit("bias", None), None),
    (_LIN, "no teacher", lambda a, kw: (a.pop(4), a.pop(3)), None),
    (_LIN, "teacher_probs", lambda a, kw: (a.pop(4), kw.update(teacher_probs=torch.rand(B, K))), None),
    (_LIN, "scores without tokens", lambda a, kw: (a.pop(3), a.pop(3), kw.update(teacher_scores=torch.rand(B, K))), "teacher_tokens"),
    (_LIN, "bf16", lambda a, kw: (a.__setitem__(0, a[0].bfloat16()), a.__setitem__(1, a[1].bfloat16())), None),
    (_LIN, "weight D", edit(1, lambda a: torch.randn(V, D + 1)), "weight"),
    (_LIN, "weight 1-D", edit(1, lambda a: torch.randn(V)), "weight"),
    (_LIN, "bias shape", edit("bias", torch.randn(V + 1)), "bias"),
    (_LIN, "hidden T=0", lambda a, kw: (a.__setitem__(0, torch.randn(0, D)), a.__setitem__(2, a[2][:0]), a.__setitem__(3, a[3][:0]), a.__setitem__(4, a[4][:0])), "hidden"),
    (_LIN, "hidden int", edit(0, lambda a: a[0].long()), "hidden"),
    (_LIN, "hidden NaN", edit(0, lambda a: a[0].index_fill(1, torch.tensor([2]), NAN)), "logits"),
    (_LIN, "teacher_tokens >= V", edit(3, lambda a: a[3].clone().fill_(V)), "teacher_tokens"),
    (_LIN, "teacher_scores shape", edit(4, torch.randn(B, K + 1)), "teacher_scores"),
    (_LIN, "targets >= V", edit(2, torch.tensor([1, V, 0])), "targets"),
    (_LIN, "chunk -1", edit("chunk", -1), "chunk"),
    (_LIN, "chunk 3", edit("chunk", 3), None),
    (_LIN, "kd kl", edit("kd", "kl"), None),
    (_LIN, "label_smoothing 1", edit("label_smoothing", 1.0), "label_smoothing"),
]


def outcome(fn, a, kw):
    try:
        fn(*a, **kw)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("op,name,change,expected", CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_ops_and_reference_accept_the_same_calls(op, name, change, expected):
    results = {}
    for label, module in (("ops", knnfast), ("reference", ref)):
        a, kw = base_call(op)
        change(a, kw)
        results[label] = outcome(getattr(module, op), a, kw)
    for label, message in results.items():
        if expected is None:
            assert message is None, f"{label} rejected a valid call ({name}): {message}"
        else:
            assert message is not None, f"{label} accepted an invalid call ({name})"
            assert message.startswith(f"{op}: "), message
            assert expected in message, f"{label}: {message!r} does not name {expected!r}"


# Rejections decided by metadata alone (dims, shapes, dtypes): the fake kernels must make them
# too, so that torch.compile / meta tensors fail as clearly as the real kernels.
META_CASES = ("queries 1-D", "queries int", "keys D", "keys N=0", "norms shape", "exclude shape",
              "exclude float", "indices rows", "indices float", "tokens float", "tokens rows",
              "scores int", "scores k", "temperature [B+1]", "lam [2]", "logits int",
              "logits 1-D", "targets rows", "targets float", "teacher_scores shape", "float",
              "1-D", "weight D", "weight 1-D", "bias shape", "hidden T=0", "offsets float",
              "offsets 2-D", "offsets L=0", "probes rows", "probes P=0", "probes float")


def to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("op,name,change,expected",
                         [c for c in CASES if c[1] in META_CASES and c[3] is not None],
                         ids=[f"{c[0]}-{c[1]}" for c in CASES if c[1] in META_CASES and c[3]])
def test_fake_kernels_reject_bad_metadata(op, name, change, expected):
    a, kw = base_call(op)
    change(a, kw)
    a = [to_meta(x) for x in a]
    kw = {key: to_meta(x) for key, x in kw.items()}
    with pytest.raises(ValueError, match=f"{op}: .*{expected}"):
        getattr(knnfast, op)(*a, **kw)
