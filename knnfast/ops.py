"""Python entry points of the fused ops: argument checks, float -> tensor conversion of the
per-row parameters, fake (meta) kernels for torch.compile, and the library loader.

Each function calls ``torch.ops.knnfast.<same name>``; semantics are in DESIGN §2-3 and in
each docstring. All argument errors raise ``ValueError`` naming the argument; the C++ kernels
repeat the checks (and check values, which needs the data), so direct ``torch.ops`` calls
fail just as clearly.
"""
from __future__ import annotations

import glob
import os
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "build_info",
    "knn_search",
    "knn_rescore",
    "knn_probs",
    "knn_probs_sparse",
    "knn_interpolate",
    "knn_gold_logprob",
    "label_counts",
    "knn_kd_loss",
]

MAX_K = 2048
METRICS = ("l2", "ip", "cos")
RowScalar = Union[float, Tensor]


def _load_library() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")))
    if not candidates:
        raise ImportError(
            "knnfast: the compiled library (knnfast/_C*.so) is missing; build it with "
            "`pip install --no-build-isolation -e .` (or `make build`)"
        )
    torch.ops.load_library(candidates[0])


_load_library()
_ops = torch.ops.knnfast


# ----------------------------------------------------------------------------- checks


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _check_dim(op: str, name: str, t: Tensor, dim: int) -> None:
    if not isinstance(t, Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        _fail(op, f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_same_device(op: str, reference: Tensor, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.device != reference.device:
            _fail(op, f"{name} is on {t.device} but the other inputs are on {reference.device}")


def _check_rows(op: str, name: str, t: Tensor, rows: int) -> None:
    if t.shape[0] != rows:
        _fail(op, f"{name} must have {rows} rows, got shape {tuple(t.shape)}")


def _row_scalar(op: str, name: str, value: RowScalar, rows: int, device: torch.device,
                positive: bool) -> Tensor:
    """A float or a per-row tensor -> float32 tensor of shape [1] or [rows] on `device`."""
    if isinstance(value, Tensor):
        if value.numel() != 1 and tuple(value.shape) != (rows,):
            _fail(op, f"{name} must be a float or a tensor of shape [{rows}], "
                      f"got shape {tuple(value.shape)}")
        if value.device != device:
            _fail(op, f"{name} is on {value.device} but the other inputs are on {device}")
        return value.reshape(-1).to(torch.float32)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(op, f"{name} must be a float or a tensor, got {type(value).__name__}")
    value = float(value)
    if positive and not (0.0 < value < float("inf")):
        _fail(op, f"{name} must be > 0 and finite, got {value}")
    if not positive and not (0.0 <= value <= 1.0):
        _fail(op, f"{name} must be in [0, 1], got {value}")
    return torch.full((1,), value, dtype=torch.float32, device=device)


def _check_neighbours(op: str, rows: int, tokens: Tensor, scores: Optional[Tensor],
                      weights: Optional[Tensor]) -> None:
    _check_dim(op, "tokens", tokens, 2)
    _check_rows(op, "tokens", tokens, rows)
    if (scores is None) == (weights is None):
        _fail(op, "pass exactly one of scores or weights")
    given_name, given = ("scores", scores) if scores is not None else ("weights", weights)
    _check_dim(op, given_name, given, 2)
    if given.shape != tokens.shape:
        _fail(op, f"{given_name} must have the shape of tokens {tuple(tokens.shape)}, "
                  f"got {tuple(given.shape)}")


# ----------------------------------------------------------------------------- ops


def knn_search(queries: Tensor, keys: Tensor, k: int, metric: str = "l2", *,
               key_sq_norms: Optional[Tensor] = None,
               exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact k nearest keys of every query, fused (never materializes B x N).

    Args:
        queries: [B, D] float32/float16/bfloat16.
        keys: [N, D] float32/float16/bfloat16 (need not match the queries' dtype).
        k: neighbours per query, 1 <= k <= 2048. N < k pads with (-inf, -1).
        metric: "l2" (score = -|q-k|^2), "ip" (q.k) or "cos".
        key_sq_norms: optional float32 [N] cache of |k|^2 (used by l2 and cos).
        exclude: optional int64 [B]: one entry id per query never returned (-1 = none).

    Returns:
        (scores [B, k] float32 sorted descending, indices [B, k] int64); ties go to the
        smaller index. Queries with NaN/inf raise ValueError; NaN keys are never returned.

    Example:
        >>> keys = torch.randn(1000, 64)
        >>> scores, ids = knn_search(keys[:4], keys, k=3)
        >>> ids[:, 0].tolist()
        [0, 1, 2, 3]
    """
    op = "knn_search"
    _check_dim(op, "queries", queries, 2)
    _check_dim(op, "keys", keys, 2)
    _check_same_device(op, queries, keys=keys, key_sq_norms=key_sq_norms, exclude=exclude)
    if metric not in METRICS:
        _fail(op, f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        _fail(op, f"k must be an int in [1, {MAX_K}], got {k!r}")
    if keys.shape[0] == 0:
        _fail(op, "keys must have at least one row (N = 0)")
    if queries.shape[1] != keys.shape[1]:
        _fail(op, f"queries and keys must have the same dimension D, got queries "
                  f"{tuple(queries.shape)} and keys {tuple(keys.shape)}")
    return _ops.knn_search(queries, keys, k, metric, key_sq_norms, exclude)


def knn_rescore(queries: Tensor, keys: Tensor, indices: Tensor, metric: str = "l2") -> Tensor:
    """Exact fp32 scores [B, k] of the candidate ids `indices` [B, k] (-1 -> -inf).

    The "real score" of an approximate (e.g. FAISS IVFPQ) search: rows of `keys` are
    gathered by index without copying the datastore; l2 uses the direct difference.
    """
    op = "knn_rescore"
    _check_dim(op, "queries", queries, 2)
    _check_dim(op, "keys", keys, 2)
    _check_dim(op, "indices", indices, 2)
    _check_same_device(op, queries, keys=keys, indices=indices)
    _check_rows(op, "indices", indices, queries.shape[0])
    if metric not in METRICS:
        _fail(op, f"metric must be one of {METRICS}, got {metric!r}")
    return _ops.knn_rescore(queries, keys, indices, metric)


def knn_probs(scores: Tensor, tokens: Tensor, vocab_size: int,
              temperature: RowScalar = 1.0) -> Tensor:
    """Dense P_kNN [B, V] = M . softmax(scores / temperature) (rows without a valid
    neighbour are all zeros)."""
    op = "knn_probs"
    _check_dim(op, "scores", scores, 2)
    _check_neighbours(op, scores.shape[0], tokens, scores, None)
    _check_same_device(op, scores, tokens=tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        _fail(op, f"vocab_size must be a positive int, got {vocab_size!r}")
    tau = _row_scalar(op, "temperature", temperature, scores.shape[0], scores.device, True)
    return _ops.knn_probs(scores, tokens, vocab_size, tau)


def knn_probs_sparse(scores: Tensor, tokens: Tensor,
                     temperature: RowScalar = 1.0) -> Tuple[Tensor, Tensor]:
    """P_kNN in k slots: (tokens_u [B, k] int64, probs [B, k] float32). Duplicate tokens are
    merged into their first occurrence; the later slots become (-1, 0)."""
    op = "knn_probs_sparse"
    _check_dim(op, "scores", scores, 2)
    _check_neighbours(op, scores.shape[0], tokens, scores, None)
    _check_same_device(op, scores, tokens=tokens)
    tau = _row_scalar(op, "temperature", temperature, scores.shape[0], scores.device, True)
    return _ops.knn_probs_sparse(scores, tokens, tau)


def knn_interpolate(logits: Tensor, tokens: Tensor, *, scores: Optional[Tensor] = None,
                    weights: Optional[Tensor] = None, temperature: RowScalar = 1.0,
                    lam: RowScalar = 0.5, out: Optional[Tensor] = None) -> Tensor:
    """log((1 - lam) softmax(logits) + lam P_kNN) as float32 [B, V].

    P_kNN = M . softmax(scores / temperature), or M . weights for given neighbour weights
    (adaptive methods). A row with no valid neighbour returns log_softmax(logits) (as if
    lam = 0); lam = 1 gives log P_kNN (-inf off the neighbours). NaN or +inf in a logits
    row raises ValueError. `out` (float32 [B, V], contiguous) is written in place and
    returned; it may be `logits` itself when logits are float32.

    Example:
        >>> logits = torch.randn(2, 10)
        >>> tokens = torch.tensor([[3, 3, 7], [1, -1, -1]])
        >>> scores = torch.tensor([[-1.0, -2.0, -4.0], [0.0, float("-inf"), float("-inf")]])
        >>> logp = knn_interpolate(logits, tokens, scores=scores, temperature=1.0, lam=0.5)
        >>> bool(torch.allclose(logp.exp().sum(1), torch.ones(2)))
        True
    """
    op = "knn_interpolate"
    _check_dim(op, "logits", logits, 2)
    _check_neighbours(op, logits.shape[0], tokens, scores, weights)
    _check_same_device(op, logits, tokens=tokens, scores=scores, weights=weights, out=out)
    rows = logits.shape[0]
    tau = _row_scalar(op, "temperature", temperature, rows, logits.device, True)
    lam_t = _row_scalar(op, "lam", lam, rows, logits.device, False)
    if out is None:
        return _ops.knn_interpolate(logits, tokens, scores, weights, tau, lam_t)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (logits, scores, weights, temperature, lam)):
        _fail(op, "out= is not differentiable; drop out= when gradients are needed")
    if out.dtype != torch.float32 or out.shape != logits.shape or not out.is_contiguous():
        _fail(op, f"out must be a contiguous float32 tensor of shape {tuple(logits.shape)}, "
                  f"got {out.dtype} {tuple(out.shape)}")
    _ops.knn_interpolate.out(logits, tokens, scores, weights, tau, lam_t, out=out)
    return out


def knn_gold_logprob(logits: Tensor, targets: Tensor, tokens: Tensor, *,
                     scores: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                     temperature: RowScalar = 1.0, lam: RowScalar = 0.5,
                     ignore_index: int = -100) -> Tensor:
    """knn_interpolate at the target token only: float32 [B] (0 where targets ==
    ignore_index). Reads the logits once; for perplexity evaluation and λ/τ tuning."""
    op = "knn_gold_logprob"
    _check_dim(op, "logits", logits, 2)
    _check_dim(op, "targets", targets, 1)
    _check_rows(op, "targets", targets, logits.shape[0])
    _check_neighbours(op, logits.shape[0], tokens, scores, weights)
    _check_same_device(op, logits, targets=targets, tokens=tokens, scores=scores,
                       weights=weights)
    rows = logits.shape[0]
    tau = _row_scalar(op, "temperature", temperature, rows, logits.device, True)
    lam_t = _row_scalar(op, "lam", lam, rows, logits.device, False)
    return _ops.knn_gold_logprob(logits, targets, tokens, scores, weights, tau, lam_t,
                                 int(ignore_index))


def label_counts(tokens: Tensor) -> Tensor:
    """counts[b, j] = number of distinct valid (!= -1) tokens in tokens[b, :j+1] (int64);
    the adaptive kNN-MT feature. Token 0 counts like any other."""
    _check_dim("label_counts", "tokens", tokens, 2)
    return _ops.label_counts(tokens)


def knn_kd_loss(logits: Tensor, targets: Tensor, teacher_tokens: Tensor,
                teacher_scores: Optional[Tensor] = None, *,
                teacher_probs: Optional[Tensor] = None, temperature: RowScalar = 1.0,
                ce_weight: float = 1.0, kd_weight: float = 1.0, label_smoothing: float = 0.0,
                ignore_index: int = -100, reduction: str = "mean", kd: str = "ce") -> Tensor:
    """kNN-KD loss without a dense teacher: ce_weight * CE_ls(logits, y) + kd_weight * KD.

    KD = H(p_T, softmax(logits)) (kd="ce") or KL(p_T || softmax(logits)) (kd="kl"), with the
    teacher p_T = M . softmax(teacher_scores / temperature) over the k stored neighbours
    (token -1 = padding) or M . teacher_probs. The paper's (1 - a) CE + a KD is
    ce_weight=1-a, kd_weight=a; the released code's LS-CE(0.1) + rate * KL is
    label_smoothing=0.1, kd="kl", kd_weight=rate. Rows with targets == ignore_index give 0
    and are not counted by "mean". Forward reads the logits once; backward writes
    softmax - target mix directly. Gradients reach logits only.
    """
    op = "knn_kd_loss"
    _check_dim(op, "logits", logits, 2)
    _check_dim(op, "targets", targets, 1)
    _check_rows(op, "targets", targets, logits.shape[0])
    _check_dim(op, "teacher_tokens", teacher_tokens, 2)
    _check_rows(op, "teacher_tokens", teacher_tokens, logits.shape[0])
    if (teacher_scores is None) == (teacher_probs is None):
        _fail(op, "exactly one of teacher_scores or teacher_probs must be given, got "
                  + ("both" if teacher_scores is not None else "neither"))
    given_name, given = (("teacher_scores", teacher_scores) if teacher_scores is not None
                         else ("teacher_probs", teacher_probs))
    if given.shape != teacher_tokens.shape:
        _fail(op, f"{given_name} must have shape {list(teacher_tokens.shape)} like "
                  f"teacher_tokens, got {tuple(given.shape)}")
    _check_same_device(op, logits, targets=targets, teacher_tokens=teacher_tokens,
                       teacher_scores=teacher_scores, teacher_probs=teacher_probs)
    if reduction not in ("none", "sum", "mean"):
        _fail(op, f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if kd not in ("ce", "kl"):
        _fail(op, f"kd must be 'ce' or 'kl', got {kd!r}")
    tau = _row_scalar(op, "temperature", temperature, logits.shape[0], logits.device, True)
    rows = _ops.knn_kd_loss(logits, targets, teacher_tokens, teacher_scores, teacher_probs, tau,
                            float(ce_weight), float(kd_weight), float(label_smoothing),
                            int(ignore_index), kd == "kl")
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = (targets != ignore_index).sum().clamp(min=1)
    return rows.sum() / count.to(rows.dtype)


def build_info() -> dict:
    """How knnfast was built and what it will use here.

    Keys: version, torch_version, cuda_compiled (CUDA kernels built in), cuda_available,
    openmp, openmp_threads, simd ("avx512" or "generic" for the CPU kernels),
    avx512_bf16 (bf16 dot products available to the bf16 GEMM search path).
    """
    info: dict = {}
    for item in _ops.build_info().split(";"):
        key, _, value = item.partition("=")
        info[key] = value
    for key in ("cuda_compiled", "openmp", "avx512_bf16"):
        info[key] = info.get(key) == "1"
    info["openmp_threads"] = int(info.get("openmp_threads", "0"))
    info["torch_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info


# ----------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("knnfast::knn_search")
def _(queries, keys, k, metric, key_sq_norms, exclude):
    shape = (queries.shape[0], k)
    return (queries.new_empty(shape, dtype=torch.float32),
            queries.new_empty(shape, dtype=torch.int64))


@torch.library.register_fake("knnfast::knn_rescore")
def _(queries, keys, indices, metric):
    return queries.new_empty(indices.shape, dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_probs")
def _(scores, tokens, vocab_size, temperature):
    return scores.new_empty((scores.shape[0], vocab_size), dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_probs_sparse")
def _(scores, tokens, temperature):
    return (tokens.new_empty(tokens.shape, dtype=torch.int64),
            scores.new_empty(scores.shape, dtype=torch.float32))


@torch.library.register_fake("knnfast::knn_interpolate")
def _(logits, tokens, scores, weights, temperature, lam):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_interpolate.out")
def _(logits, tokens, scores, weights, temperature, lam, *, out):
    return None


@torch.library.register_fake("knnfast::knn_gold_logprob")
def _(logits, targets, tokens, scores, weights, temperature, lam, ignore_index):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_kd_loss")
def _(logits, targets, teacher_tokens, teacher_scores, teacher_probs, temperature, ce_weight,
      kd_weight, label_smoothing, ignore_index, kl):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_kd_loss_backward")
def _(grad_rows, logits, targets, teacher_tokens, teacher_scores, teacher_probs, temperature,
      ce_weight, kd_weight, label_smoothing, ignore_index):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_kd_loss_grad_")
def _(logits, grad_rows, targets, teacher_tokens, teacher_scores, teacher_probs, temperature,
      ce_weight, kd_weight, label_smoothing, ignore_index):
    return None


@torch.library.register_fake("knnfast::label_counts")
def _(tokens):
    return tokens.new_empty(tokens.shape, dtype=torch.int64)


# ----------------------------------------------------------------------------- autograd
#
# knn_interpolate and knn_gold_logprob are differentiable w.r.t. logits, scores (or weights),
# and tensor-valued temperature / lam (adaptive methods learn lam and the neighbour weights).
# With out = log P, P = (1 - lam) p + lam q, p = softmax(logits), q = M . w, w the neighbour
# weights, every factor below is a ratio written in log space (exp(log a - out) <= 1 for the
# parts of P), so nothing overflows as lam -> 0 or 1 or weights -> 0. The backward passes are
# composite PyTorch code: they run only in training / tuning, where the dense gradient of the
# logits has to be written anyway.


def _rows(t: Tensor, rows: int) -> Tensor:
    return t.reshape(-1).float().expand(rows)


def _neighbour_weights(tokens: Tensor, scores: Optional[Tensor], weights: Optional[Tensor],
                       tau: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(w [B, k] float32 with 0 on invalid slots, valid [B, k], has_neighbour [B, 1])."""
    valid = tokens >= 0
    if scores is not None:
        z = (scores.float() / tau[:, None]).masked_fill(~valid, float("-inf"))
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        has = torch.isfinite(lse)
        w = torch.where(has, torch.exp(z - lse.masked_fill(~has, 0.0)), torch.zeros_like(z))
        valid = valid & torch.isfinite(z)
    else:
        w = torch.where(valid, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
        has = (w > 0).any(dim=1, keepdim=True)
    return w, valid, has


def _finite_exp(x: Tensor) -> Tensor:
    """exp(x) with NaN (from -inf - -inf) mapped to 0: the term is absent."""
    return torch.exp(torch.nan_to_num(x, nan=float("-inf")))


def _neighbour_grads(g_t: Tensor, out_t: Tensor, tokens: Tensor, scores, weights,
                     tau: Tensor, lam_eff: Tensor):
    """Gradients through P_kNN. g_t [B, k]: upstream gradient at each slot's token; out_t
    [B, k]: the output there. Returns (g_scores, g_weights, g_tau_rows, g_lam_rows_knn)."""
    w, valid, has = _neighbour_weights(tokens, scores, weights, tau)
    log_w = torch.log(w)
    log_lam = torch.log(lam_eff)[:, None]
    # share of P at token t_j that comes from slot j: lam w_j / P(t_j), in [0, 1]
    share = _finite_exp(log_lam + log_w - out_t) * valid
    g_scores = g_weights = g_tau = None
    if scores is not None:
        a = share * g_t
        g_z = a - w * a.sum(dim=1, keepdim=True)  # d out / d (scores / tau)
        g_scores = torch.where(valid, g_z / tau[:, None], torch.zeros_like(g_z))
        s = torch.where(valid, scores.float(), torch.zeros_like(g_z))
        g_tau = -(g_scores * s).sum(dim=1) / tau
    else:
        g_weights = torch.where(tokens >= 0, g_t * _finite_exp(log_lam - out_t),
                                torch.zeros_like(g_t))
    # sum_j g_t w_j / P(t_j): the kNN side of d out / d lam
    g_lam = (g_t * _finite_exp(log_w - out_t) * valid).sum(dim=1)
    return g_scores, g_weights, g_tau, g_lam * has[:, 0]


def _reduce_to(grad_rows: Optional[Tensor], like: Tensor, needed: bool) -> Optional[Tensor]:
    """Per-row gradient -> the shape of the parameter tensor ([1] sums the rows)."""
    if not needed or grad_rows is None:
        return None
    g = grad_rows.sum().reshape(1) if like.numel() == 1 else grad_rows
    return g.reshape(like.shape).to(like.dtype)


def _setup_context(ctx, inputs, output):
    logits, tokens, scores, weights, temperature, lam = inputs
    ctx.save_for_backward(logits, tokens, scores, weights, temperature, lam, output)


def _interpolate_backward(ctx, grad):
    logits, tokens, scores, weights, temperature, lam, out = ctx.saved_tensors
    B = logits.shape[0]
    needs = ctx.needs_input_grad
    tokens = tokens.long()
    tau = _rows(temperature, B)
    _, _, has = _neighbour_weights(tokens, scores, weights, tau)
    lam_eff = torch.where(has[:, 0], _rows(lam, B), torch.zeros(B, device=logits.device))
    g = grad.float()
    logp = torch.log_softmax(logits.float(), dim=-1)
    g_logits = g_lam = None
    if needs[0]:
        model_share = _finite_exp(torch.log1p(-lam_eff)[:, None] + logp - out)
        gr = g * model_share
        g_logits = (gr - torch.exp(logp) * gr.sum(dim=1, keepdim=True)).to(logits.dtype)
    idx = tokens.clamp(min=0)
    g_scores, g_weights, g_tau, g_lam_knn = _neighbour_grads(
        g.gather(1, idx), out.gather(1, idx), tokens, scores, weights, tau, lam_eff)
    if needs[5]:
        g_lam_model = (g * _finite_exp(logp - out)).sum(dim=1) * has[:, 0]
        g_lam = g_lam_knn - g_lam_model
    return (g_logits, None, g_scores if needs[2] else None, g_weights if needs[3] else None,
            _reduce_to(g_tau, temperature, needs[4]), _reduce_to(g_lam, lam, needs[5]))


def _gold_backward(ctx, grad):
    logits, targets, tokens, scores, weights, temperature, lam, out = ctx.saved_tensors
    ignore_index = ctx.ignore_index
    B = logits.shape[0]
    needs = ctx.needs_input_grad
    tokens = tokens.long()
    live = targets != ignore_index
    y = torch.where(live, targets.long(), torch.zeros_like(targets, dtype=torch.long))
    tau = _rows(temperature, B)
    _, _, has = _neighbour_weights(tokens, scores, weights, tau)
    lam_eff = torch.where(has[:, 0], _rows(lam, B), torch.zeros(B, device=logits.device))
    g = torch.where(live, grad.float(), torch.zeros_like(grad, dtype=torch.float32))
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp_y = logp.gather(1, y[:, None])[:, 0]
    g_logits = g_lam = None
    if needs[0]:
        model_share = _finite_exp(torch.log1p(-lam_eff) + logp_y - out)
        coef = (g * model_share)[:, None]
        onehot = torch.zeros_like(logp).scatter_(1, y[:, None], 1.0)
        g_logits = (coef * (onehot - torch.exp(logp))).to(logits.dtype)
    g_t = g[:, None] * (tokens == y[:, None])
    g_scores, g_weights, g_tau, g_lam_knn = _neighbour_grads(
        g_t, out[:, None].expand_as(g_t), tokens, scores, weights, tau, lam_eff)
    if needs[6]:
        g_lam = g_lam_knn - g * _finite_exp(logp_y - out) * has[:, 0]
    return (g_logits, None, None, g_scores if needs[3] else None,
            g_weights if needs[4] else None, _reduce_to(g_tau, temperature, needs[5]),
            _reduce_to(g_lam, lam, needs[6]), None)


def _gold_setup_context(ctx, inputs, output):
    logits, targets, tokens, scores, weights, temperature, lam, ignore_index = inputs
    ctx.ignore_index = ignore_index
    ctx.save_for_backward(logits, targets, tokens, scores, weights, temperature, lam, output)


torch.library.register_autograd("knnfast::knn_interpolate", _interpolate_backward,
                                setup_context=_setup_context)
torch.library.register_autograd("knnfast::knn_gold_logprob", _gold_backward,
                                setup_context=_gold_setup_context)


def _kd_setup_context(ctx, inputs, output):
    (logits, targets, tokens, scores, probs, temperature, ce_w, kd_w, eps, ignore_index,
     _kl) = inputs
    ctx.args = (ce_w, kd_w, eps, ignore_index)
    ctx.save_for_backward(logits, targets, tokens, scores, probs, temperature)


def _kd_backward(ctx, grad_rows):
    logits, targets, tokens, scores, probs, temperature = ctx.saved_tensors
    grad = _ops.knn_kd_loss_backward(grad_rows.contiguous(), logits, targets, tokens, scores,
                                     probs, temperature, *ctx.args)
    return (grad.to(logits.dtype),) + (None,) * 10


torch.library.register_autograd("knnfast::knn_kd_loss", _kd_backward,
                                setup_context=_kd_setup_context)
