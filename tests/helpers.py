"""Helpers shared by the knnfast tests (exact float64 scores, tie-aware top-k checks)."""

import torch

NEG_INF = float("-inf")
METRICS = ("l2", "ip", "cos")
KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def exact_scores(queries, keys, metric):
    """Full [B, N] float64 score matrix from the stored (possibly half) values."""
    q = queries.detach().to("cpu", torch.float64)
    k = keys.detach().to("cpu", torch.float64)
    if metric == "l2":
        return -((q[:, None, :] - k[None, :, :]) ** 2).sum(-1)
    dots = q @ k.T
    if metric == "ip":
        return dots
    qn = q.norm(dim=1, keepdim=True).clamp_min(1e-8)
    kn = k.norm(dim=1).clamp_min(1e-8)
    return dots / (qn * kn[None, :])


def score_scale(queries, keys, metric):
    """Per-row magnitude [B, 1] (float64) that score errors are relative to."""
    q = queries.detach().to("cpu", torch.float64)
    k = keys.detach().to("cpu", torch.float64)
    qn = q.norm(dim=1, keepdim=True)
    kn = torch.nan_to_num(k.norm(dim=1), nan=0.0)  # NaN keys are never returned
    kmax = kn.max() if k.shape[0] else torch.tensor(0.0, dtype=torch.float64)
    if metric == "l2":
        return qn ** 2 + kmax ** 2 + 1.0
    if metric == "ip":
        return qn * kmax + 1.0
    return torch.ones_like(qn)


def gather_exact(full, idx):
    """full[b, idx[b, j]] with -inf for idx == -1 (float64, CPU)."""
    idx = idx.detach().cpu()
    out = full.gather(1, idx.clamp(min=0))
    return out.masked_fill(idx < 0, NEG_INF)


def assert_topk_valid(scores, indices, queries, keys, k, metric, *, exclude=None,
                      rtol=1e-4, atol_rel=1e-4):
    """The returned (scores, indices) are a correct top-k under the contract.

    Checked against float64 scores recomputed from the stored keys:
      * shapes / dtypes; scores sorted descending; -inf <=> index -1;
      * no duplicate ids; ids in [0, N); excluded ids absent;
      * returned scores equal the exact scores of the returned ids;
      * the returned set is a top-k: every returned exact score is >= the
        true k-th exact score (minus tolerance), and the number of padding
        slots equals k minus the number of returnable entries;
      * ties (equal scores, within tolerance) resolved arbitrarily is
        accepted here; exact tie order is checked on exactly representable
        data elsewhere.
    """
    B = queries.shape[0]
    N = keys.shape[0]
    assert scores.shape == (B, k) and indices.shape == (B, k)
    assert scores.dtype == torch.float32, scores.dtype
    assert indices.dtype == torch.int64, indices.dtype
    s = scores.detach().cpu().double()
    idx = indices.detach().cpu()
    full = exact_scores(queries, keys, metric)
    full = torch.nan_to_num(full, nan=NEG_INF, neginf=NEG_INF)
    if exclude is not None:
        ex = exclude.cpu()
        rows = (ex >= 0).nonzero().squeeze(1)
        full[rows, ex[rows]] = NEG_INF
    scale = score_scale(queries, keys, metric)
    atol = atol_rel * scale  # [B, 1]

    assert ((idx >= -1) & (idx < N)).all(), "index out of range"
    assert torch.equal(idx == -1, torch.isneginf(s)), f"-inf <=> -1 violated:\n{s}\n{idx}"
    assert (s[:, :-1] >= s[:, 1:]).all(), f"scores not sorted descending:\n{s}"
    for b in range(B):
        v = idx[b][idx[b] >= 0]
        assert v.unique().numel() == v.numel(), f"duplicate ids in row {b}: {idx[b]}"
        if exclude is not None and int(exclude[b]) >= 0:
            assert int(exclude[b]) not in v.tolist(), f"excluded id {int(exclude[b])} returned in row {b}"
    ex_ret = gather_exact(full, idx)
    fin = idx >= 0
    diff = (s - ex_ret).abs().masked_fill(~fin, 0.0)
    tol = (atol + rtol * ex_ret.abs()).masked_fill(~fin, 1.0)
    assert (diff <= tol).all(), (
        f"returned scores differ from exact scores of returned ids: max diff "
        f"{(diff - tol).max().item()} over tolerance")
    # top-k set: compare with the true sorted scores
    n_valid = torch.isfinite(full).sum(dim=1)  # returnable entries per row
    n_ret = fin.sum(dim=1)
    assert torch.equal(n_ret, n_valid.clamp(max=k)), f"padding count wrong: {n_ret} vs {n_valid}"
    true_sorted = torch.sort(full, dim=1, descending=True).values[:, :k]
    if true_sorted.shape[1] < k:
        pad = torch.full((B, k - true_sorted.shape[1]), NEG_INF, dtype=torch.float64)
        true_sorted = torch.cat([true_sorted, pad], dim=1)
    # elementwise: the j-th returned exact score matches the j-th true score
    both_fin = torch.isfinite(true_sorted) & fin
    d2 = (ex_ret - true_sorted).abs().masked_fill(~both_fin, 0.0)
    tol2 = (atol + rtol * true_sorted.abs()).masked_fill(~both_fin, 1.0)
    assert (d2 <= tol2).all(), (
        "returned set is not the exact top-k:\n"
        f"returned exact {ex_ret[(d2 > tol2).any(1)][:2]}\ntrue {true_sorted[(d2 > tol2).any(1)][:2]}")


def assert_topk_parity(scores, indices, ref_scores, ref_indices, queries, keys, metric,
                       *, rtol=1e-4, atol_rel=1e-4):
    """Kernel vs reference: score values within tolerance; where the ids differ,
    the float64 exact scores of both ids agree within tolerance (a tie)."""
    assert scores.shape == ref_scores.shape and indices.shape == ref_indices.shape
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    s = scores.detach().cpu().double()
    r = ref_scores.detach().cpu().double()
    scale = score_scale(queries, keys, metric)
    atol = atol_rel * scale
    fin = torch.isfinite(r)
    assert torch.equal(torch.isneginf(s), torch.isneginf(r)), f"padding differs:\n{s}\n{r}"
    diff = (s - r).abs().masked_fill(~fin, 0.0)
    tol = (atol + rtol * r.abs()).masked_fill(~fin, 1.0)
    assert (diff <= tol).all(), (
        f"score values differ from reference; worst row:\n"
        f"kernel {s[(diff > tol).any(1)][0]}\nref    {r[(diff > tol).any(1)][0]}")
    idx = indices.detach().cpu()
    ridx = ref_indices.detach().cpu()
    differ = idx != ridx
    if differ.any():
        full = exact_scores(queries, keys, metric)
        a = gather_exact(full, idx)[differ]
        b = gather_exact(full, ridx)[differ]
        t = (atol.expand_as(idx)[differ] + rtol * b.abs())
        ok = ((a - b).abs() <= t) | (torch.isneginf(a) & torch.isneginf(b))
        assert ok.all(), (
            f"ids differ and are not ties: kernel ids {idx[differ][~ok][:5].tolist()} "
            f"(exact {a[~ok][:5].tolist()}) vs reference ids {ridx[differ][~ok][:5].tolist()} "
            f"(exact {b[~ok][:5].tolist()})")


def rand_tokens(B, k, V, *, invalid_frac=0.2, generator=None, device="cpu"):
    t = torch.randint(0, V, (B, k), generator=generator)
    if invalid_frac > 0:
        t = t.masked_fill(torch.rand(B, k, generator=generator) < invalid_frac, -1)
    return t.to(device)


def rand_scores(B, k, tokens=None, *, scale=3.0, generator=None, device="cpu"):
    s = torch.randn(B, k, generator=generator) * scale
    s = s.to(device)
    if tokens is not None:
        s = s.masked_fill(tokens < 0, NEG_INF)
    return s


def assert_logp_close(got, exp, *, atol=1e-5, rtol=1e-5, floor=-80.0):
    """Float32 log-prob comparison (kernel vs reference).

    No NaN. The reference builds P_kNN in probability space (as knn-transformers
    does), so a probability below float32's range becomes -inf there while a
    log-space kernel keeps a finite, very negative value: values below `floor`
    (exp(-80) ~ 1e-35) are treated as equal to -inf. Everything else must match
    within tolerance, and -inf must match -inf (or a value below `floor`).
    """
    assert got.dtype == torch.float32, got.dtype
    g = got.detach().cpu().double()
    e = exp.detach().cpu().double()
    assert not torch.isnan(g).any(), f"NaN in output at {torch.isnan(g).nonzero()[:5].tolist()}"
    assert g.shape == e.shape
    bad = (torch.isneginf(g) & (e >= floor)) | (torch.isneginf(e) & (g >= floor))
    assert not bad.any(), (
        f"-inf pattern differs at {bad.nonzero()[:5].tolist()}: "
        f"kernel {g[bad][:5].tolist()} reference {e[bad][:5].tolist()}")
    torch.testing.assert_close(g.clamp(min=floor), e.clamp(min=floor), atol=atol, rtol=rtol)


def log_pknn64(tokens, V, *, scores=None, weights=None, temperature=1.0):
    """log P_kNN [B, V] in float64 log space (exact -inf off the neighbour tokens).

    Small sizes only (builds [B, V, k])."""
    tok = tokens.detach().cpu()
    valid = tok >= 0
    if scores is not None:
        t = temperature.detach().cpu().double()[:, None] if isinstance(temperature, torch.Tensor) \
            else float(temperature)
        z = (scores.detach().cpu().double() / t).masked_fill(~valid, NEG_INF)
        lw = torch.log_softmax(z, dim=1)
        lw = torch.where(torch.isneginf(z.amax(1, keepdim=True)), torch.full_like(z, NEG_INF), lw)
    else:
        lw = torch.log(weights.detach().cpu().double()).masked_fill(~valid, NEG_INF)
    hit = tok[:, None, :] == torch.arange(V)[None, :, None]  # [B, V, k]
    return torch.logsumexp(lw[:, None, :].masked_fill(~hit, NEG_INF), dim=2)




def with_value(t, idx, val):
    """A copy of t with t[idx] = val (bad-input tests)."""
    t = t.clone()
    t[idx] = val
    return t


def f32_tensor(vals, device):
    return torch.tensor(vals, dtype=torch.float32, device=device)
