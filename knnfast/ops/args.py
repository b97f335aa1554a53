"""The ops' argument rules on the Python side, each defined once.

C++ (csrc/common/) checks every argument of every op on the data it receives, so a direct
``torch.ops.knnfast.<op>`` call fails as clearly as the Python wrapper. What C++ cannot see
is checked here:

* the Python types of scalar arguments (``k=True``, ``lam="0.5"``) and the conversion of a
  float or tensor ``temperature`` / ``lam`` into the float32 tensor the schema takes
  (:func:`row_scalar`), used by the wrappers and by ``knnfast.reference``;
* tensor metadata (dims, shapes, dtypes, devices) for the fake kernels, which run on meta
  tensors under ``torch.compile`` (``torch._check_value``, so traced shapes become guards):
  one ``check_<op>_meta`` per op;
* the value predicates (``check_values_*``), which the kernels apply to the data in C++ and
  the pure-PyTorch reference applies here, so that both accept exactly the same calls.

Messages follow the C++ texts (csrc/common/messages.h) where a test compares them.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..defaults import MAX_K, METRICS, REDUCTIONS

RowScalar = Union[float, Tensor]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
# neighbour scores / weights: read as float32 by the kernels (float64 for gradcheck in double)
SCORE_DTYPES = FLOAT_DTYPES + (torch.float64,)
KD_FORMS = ("ce", "kl")


def fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def need(cond, op: str, message) -> None:
    """torch._check_value with the op's prefix: a guard under tracing, else ValueError."""
    torch._check_value(cond, lambda: f"{op}: {message() if callable(message) else message}")


# ----------------------------------------------------------------------------- Python scalars


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_int(op: str, name: str, value, lo: int, hi: Optional[int] = None) -> int:
    """A Python int (not bool) in [lo, hi]."""
    ok = not isinstance(value, bool) and isinstance(value, int)
    if not ok or value < lo or (hi is not None and value > hi):
        span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        fail(op, f"{name} must be an int {span}, got {value!r}")
    return value


def check_bool(op: str, name: str, value) -> bool:
    """A Python bool (not 0/1 or a tensor)."""
    if not isinstance(value, bool):
        fail(op, f"{name} must be True or False, got {value!r}")
    return value


def check_k(op: str, k) -> int:
    return check_int(op, "k", k, 1, MAX_K)


def check_choice(op: str, name: str, value, choices) -> str:
    if value not in choices:
        fail(op, f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_metric(op: str, metric) -> str:
    return check_choice(op, "metric", metric, METRICS)


def check_reduction(op: str, reduction) -> str:
    return check_choice(op, "reduction", reduction, REDUCTIONS)


def check_kd_weights(op: str, ce_weight, kd_weight, label_smoothing) -> None:
    for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if not (math.isfinite(float(value)) and float(value) >= 0):
            fail(op, f"{name} must be a finite number >= 0, got {value}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        fail(op, f"label_smoothing must be in [0, 1), got {label_smoothing}")


def row_scalar(op: str, name: str, value: RowScalar, rows: int, device: torch.device,
               positive: bool) -> Tensor:
    """A float or a tensor of 1 or `rows` elements -> float32 tensor [1] or [rows] on `device`.

    Tensor values are range-checked where the data is read (C++, or check_values_row).
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 and tuple(value.shape) != (rows,):
            fail(op, f"{name} must be a float or a tensor of shape [{rows}], "
                     f"got shape {list(value.shape)}")
        if value.device != device:
            fail(op, f"{name} is on {value.device} but the other inputs are on {device}")
        return value.reshape(-1).to(torch.float32)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(op, f"{name} must be a float or a tensor, got {type(value).__name__}")
    value = float(value)
    if positive and not 0.0 < value < math.inf:
        fail(op, f"{name} must be > 0 and finite, got {value}")
    if not positive and not 0.0 <= value <= 1.0:
        fail(op, f"{name} must be in [0, 1], got {value}")
    return torch.full((1,), value, dtype=torch.float32, device=device)


def exactly_one(op: str, a_name: str, a, b_name: str, b) -> None:
    if (a is None) == (b is None):
        fail(op, f"exactly one of {a_name} or {b_name} must be given, got "
                 + ("both" if a is not None else "neither"))


# ----------------------------------------------------------------------------- metadata


def check_dim(op: str, name: str, t: Tensor, dim: int) -> None:
    check_tensor(op, name, t)
    need(t.dim() == dim, op, lambda: f"{name} must be {dim}-D, got shape {list(t.shape)}")


def check_dtype(op: str, name: str, t: Tensor, dtypes, words: str) -> None:
    need(t.dtype in dtypes, op, lambda: f"{name} must be {words}, got {t.dtype}")


def check_float_input(op: str, name: str, t: Tensor, dim: int = 2) -> None:
    check_dim(op, name, t, dim)
    check_dtype(op, name, t, FLOAT_DTYPES, "float32, float16 or bfloat16")


def check_index_input(op: str, name: str, t: Tensor, dim: int = 2) -> None:
    check_dim(op, name, t, dim)
    check_dtype(op, name, t, INDEX_DTYPES, "int64 or int32")


def check_logits_input(op: str, logits: Tensor) -> None:
    check_dim(op, "logits", logits, 2)
    need(logits.is_floating_point(), op,
         lambda: f"logits must be a floating-point tensor, got {logits.dtype}")
    need(logits.shape[1] > 0, op, "logits must have a vocabulary dimension > 0")


def check_same_device(op: str, first: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if isinstance(t, Tensor) and t.device != first.device:
            fail(op, f"{name} is on {t.device} but the other inputs are on {first.device}")


def check_rows(op: str, name: str, t: Tensor, rows: int) -> None:
    need(t.shape[0] == rows, op,
         lambda: f"{name} must have {rows} rows, got shape {list(t.shape)}")


def check_row_param(op: str, name: str, t: Tensor, rows: int) -> None:
    need(t.numel() == 1 or tuple(t.shape) == (rows,), op,
         lambda: f"{name} must be a float or a tensor of shape [{rows}], "
                 f"got shape {list(t.shape)}")


def check_like(op: str, name: str, t: Tensor, like_name: str, like: Tensor) -> None:
    check_dim(op, name, t, 2)
    need(t.shape == like.shape, op,
         lambda: f"{name} must have the shape of {like_name} {list(like.shape)}, "
                 f"got {list(t.shape)}")


def check_neighbour_meta(op: str, rows: int, tokens: Tensor, scores: Optional[Tensor],
                         weights: Optional[Tensor], temperature: Tensor, *,
                         names=("tokens", "scores", "weights")) -> None:
    """tokens [rows, k] integer; exactly one of scores / weights [rows, k] float;
    temperature float tensor of 1 or `rows` elements."""
    t_name, s_name, w_name = names
    check_index_input(op, t_name, tokens)
    check_rows(op, t_name, tokens, rows)
    exactly_one(op, s_name, scores, w_name, weights)
    given_name, given = (s_name, scores) if scores is not None else (w_name, weights)
    check_like(op, given_name, given, t_name, tokens)
    check_dtype(op, given_name, given, SCORE_DTYPES, "a floating-point tensor")
    check_row_param(op, "temperature", temperature, rows)


def check_targets_meta(op: str, targets: Tensor, rows: int) -> None:
    check_index_input(op, "targets", targets, dim=1)
    need(targets.shape[0] == rows, op,
         lambda: f"targets must have shape [{rows}], got {list(targets.shape)}")


def check_linear_meta(op: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """hidden [T, D] with T > 0, weight [V, D] with V > 0, bias [V] or None: floating, on one
    device (the output layer of the fused linear losses)."""
    check_dim(op, "hidden", hidden, 2)
    check_dim(op, "weight", weight, 2)
    check_same_device(op, hidden, weight=weight, bias=bias)
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None:
            need(t.is_floating_point(), op,
                 lambda: f"{name} must be a floating-point tensor, got {t.dtype}")
    need(hidden.shape[0] > 0, op, "hidden must have at least one row (T = 0)")
    need(weight.shape[0] > 0 and weight.shape[1] == hidden.shape[1], op,
         lambda: f"weight must have shape [V, {hidden.shape[1]}] with V > 0 (D of hidden "
                 f"{list(hidden.shape)}), got {list(weight.shape)}")
    if bias is not None:
        need(bias.dim() == 1 and bias.shape[0] == weight.shape[0], op,
             lambda: f"bias must have shape [{weight.shape[0]}] (V rows of weight), "
                     f"got {list(bias.shape)}")


def check_search_meta(op: str, queries: Tensor, keys: Tensor, k: int,
                      key_sq_norms: Optional[Tensor], exclude: Optional[Tensor]) -> None:
    check_float_input(op, "queries", queries)
    check_float_input(op, "keys", keys)
    check_same_device(op, queries, keys=keys, key_sq_norms=key_sq_norms, exclude=exclude)
    need(1 <= k <= MAX_K, op, lambda: f"k must be in [1, {MAX_K}], got {k}")
    need(keys.shape[0] > 0, op, "keys must have at least one row (N = 0)")
    need(queries.shape[1] == keys.shape[1] and keys.shape[1] > 0, op,
         lambda: f"queries and keys must have the same dimension D > 0, got queries "
                 f"{list(queries.shape)} and keys {list(keys.shape)}")
    if key_sq_norms is not None:
        need(tuple(key_sq_norms.shape) == (keys.shape[0],), op,
             lambda: f"key_sq_norms must have shape [{keys.shape[0]}], "
                     f"got {list(key_sq_norms.shape)}")
    if exclude is not None:
        check_index_input(op, "exclude", exclude, dim=1)
        need(exclude.shape[0] == queries.shape[0], op,
             lambda: f"exclude must have shape [{queries.shape[0]}], got {list(exclude.shape)}")


# ----------------------------------------------------------------------------- values
# What the kernels check on the data; the reference runs these so that it rejects exactly
# what the ops reject. Each reads its tensor once (they are test-oracle paths, not hot).


def first_bad(mask: Tensor) -> Optional[int]:
    """Flat position of the first True in `mask`, or None."""
    flat = mask.reshape(-1).nonzero()
    return int(flat[0]) if flat.numel() else None


def check_values_ids(op: str, name: str, ids: Tensor, bound: Optional[int],
                     where: str = "flat position") -> None:
    """Ids in [-1, bound) (bound None: no upper bound)."""
    bad = ids < -1 if bound is None else (ids < -1) | (ids >= bound)
    pos = first_bad(bad)
    if pos is not None:
        span = "inf" if bound is None else bound
        fail(op, f"{name} must hold ids in [-1, {span}), got {int(ids.reshape(-1)[pos])} "
                 f"at {where} {pos}")


def check_values_scores(op: str, name: str, scores: Tensor) -> None:
    s = scores.float()
    pos = first_bad(torch.isnan(s) | torch.isposinf(s))
    if pos is not None:
        fail(op, f"{name} must be finite or -inf, got {float(s.reshape(-1)[pos])} "
                 f"at flat position {pos}")


def check_values_weights(op: str, name: str, weights: Tensor) -> None:
    w = weights.float()
    pos = first_bad(~(torch.isfinite(w) & (w >= 0)))
    if pos is not None:
        fail(op, f"{name} must be finite and >= 0, got {float(w.reshape(-1)[pos])} "
                 f"at flat position {pos}")


def check_values_row(op: str, name: str, t: Tensor, positive: bool) -> None:
    """temperature (> 0, finite) or lam (in [0, 1]) given as a float32 tensor."""
    bad = ~((t > 0) & torch.isfinite(t)) if positive else ~((t >= 0) & (t <= 1))
    row = first_bad(bad)
    if row is not None:
        value = float(t.reshape(-1)[row])
        rule = "must be > 0 and finite" if positive else "must be in [0, 1]"
        fail(op, f"{name} {rule}, got {value} (row {row})")


def check_values_targets(op: str, targets: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    row = first_bad(bad)
    if row is not None:
        fail(op, f"targets must be in [0, {vocab}) or ignore_index ({ignore_index}), "
                 f"got {int(targets[row])} at row {row}")


def check_values_logits(op: str, logits: Tensor) -> None:
    bad_rows = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=1)
    row = first_bad(bad_rows)
    if row is not None:
        fail(op, f"logits row {row} contains NaN or +inf (log_softmax is undefined)")


def check_values_queries(op: str, queries: Tensor) -> None:
    if not bool(torch.isfinite(queries).all()):
        fail(op, "queries contain NaN or inf")


def check_values_neighbours(op: str, tokens: Tensor, scores: Optional[Tensor],
                            weights: Optional[Tensor], temperature: Tensor, vocab: Optional[int],
                            *, names=("tokens", "scores", "weights")) -> None:
    """The C++ order: tokens, then scores or weights, then temperature."""
    t_name, s_name, w_name = names
    check_values_ids(op, t_name, tokens, vocab)
    if scores is not None:
        check_values_scores(op, s_name, scores)
    else:
        check_values_scores(op, w_name, weights)
        check_values_weights(op, w_name, weights)
    check_values_row(op, "temperature", temperature, positive=True)
