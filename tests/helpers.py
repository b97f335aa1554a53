"""Helpers shared by the knnfast tests.

* exact float64 scores and tie-aware top-k checks (``assert_topk_valid``/``_parity``);
* random neighbour lists and log-prob comparisons (``rand_tokens``, ``assert_logp_close``, ...);
* the float64 autograd oracle of knn_interpolate (``oracle_interpolate``, ``autograd_inputs``);
* the bad-input helper every test file uses (``bad_input_cases``, ``check_bad_input``,
  ``check_bad_input_cpu_and_cuda``): a table ``{case name: (call, match)}`` where ``call``
  raises ValueError whose message matches the regex ``match``;
* ``run_simd_script``: a script's JSON output under KNNFAST_SIMD=auto or generic.
"""

import json
import os
import subprocess
import sys

import pytest
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


def on_meta(t):
    """An empty tensor of t's shape and dtype on the `meta` device: "another device" without a
    GPU (device-mismatch tests)."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def opcheck_neighbours(B, k, V, device):
    """Neighbour tokens in [-1, V) and scores (-inf at the -1 slots) for opcheck samples."""
    tok = torch.randint(-1, V, (B, k), device=device)
    sc = torch.randn(B, k, device=device).masked_fill(tok < 0, NEG_INF)
    return tok, sc


def neighbours_with_duplicates(B, k, V, invalid=0.2, seed=0):
    """CPU (tokens, scores) with padding slots and duplicate tokens on purpose (the leader
    logic of the kernels merges them); CPU <-> CUDA agreement tests."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, k), generator=g)
    tokens = tokens.masked_fill(torch.rand(B, k, generator=g) < invalid, -1)
    tokens[:, 1::3] = tokens[:, 0::3][:, : tokens[:, 1::3].shape[1]]
    scores = (torch.randn(B, k, generator=g) * 3).masked_fill(tokens < 0, NEG_INF)
    return tokens, scores


# --------------------------------------------------------------------------- autograd oracle
def oracle_interpolate(logits, tokens, scores=None, weights=None, tau=1.0, lam=0.5):
    """log((1-lam) softmax(logits) + lam P_kNN) in float64, differentiable in every input."""
    logits = logits.double()
    B, V = logits.shape
    valid = tokens >= 0
    if scores is not None:
        tau = torch.as_tensor(tau, dtype=torch.float64).reshape(-1, 1)
        z = (scores.double() / tau).masked_fill(~valid, float("-inf"))
        has = torch.isfinite(z).any(1, keepdim=True)
        w = torch.softmax(z.masked_fill(~has, 0.0), dim=1) * has * valid
    else:
        w = weights.double() * valid
        has = (w > 0).any(1, keepdim=True)
    q = torch.zeros(B, V, dtype=torch.float64).scatter_add(1, tokens.clamp(min=0), w)
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, 1) * has
    # log(q) with a zero gradient where q == 0 (plain log would give 0 * inf = NaN there)
    log_q = torch.where(q > 0, torch.log(torch.where(q > 0, q, torch.ones_like(q))), float("-inf"))
    return torch.logaddexp(torch.log1p(-lam) + torch.log_softmax(logits, 1), torch.log(lam) + log_q)


def autograd_inputs(B=5, V=40, k=6, seed=0):
    """(logits, tokens, scores, weights, lam, tau) with duplicate and invalid neighbour slots."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 2
    tokens = torch.randint(0, V, (B, k), generator=g)
    tokens[:, 1] = tokens[:, 0]          # duplicates
    tokens[0, -2:] = -1                  # invalid slots
    scores = -torch.rand(B, k, generator=g) * 6
    weights = torch.softmax(torch.randn(B, k, generator=g), 1)
    lam = torch.rand(B, generator=g) * 0.8 + 0.1
    tau = torch.rand(B, generator=g) + 0.5
    return logits, tokens, scores, weights, lam, tau


def grads_against(out, upstream, tensors):
    """d (out * upstream).sum() / d tensors (None for unused ones), in float64."""
    return torch.autograd.grad((out.double() * upstream).sum(), tensors, allow_unused=True)


# --------------------------------------------------------------------------- bad inputs
def bad_input_cases(table):
    """Parameters for ``@pytest.mark.parametrize("call,match", bad_input_cases(TABLE))`` from a
    table ``{case name: (call, match)}``; the test ids are the case names."""
    return [pytest.param(call, match, id=name) for name, (call, match) in table.items()]


def check_bad_input(call, match, *args, **kwargs):
    """``call(*args, **kwargs)`` raises ValueError whose message matches the regex ``match``
    (``re.search``); returns the ExceptionInfo."""
    with pytest.raises(ValueError, match=match) as info:
        call(*args, **kwargs)
    return info


def check_bad_input_cpu_and_cuda(call, match):
    """``call(device)`` raises the same ValueError on "cpu" and on "cuda" (the CUDA error may
    surface only at the synchronisation after the kernel: the in-kernel checks)."""
    check_bad_input(call, match, "cpu")

    def on_cuda():
        call("cuda")
        torch.cuda.synchronize()

    check_bad_input(on_cuda, match)



def check_off_never_crashes(call):
    """With the CUDA value checks switched off, a call with bad values reports nothing but
    never reads or writes out of bounds (synchronized, so a fault surfaces here)."""
    from knnfast.ops.settings import override
    with override(cuda_checks=False):
        call("cuda")
        torch.cuda.synchronize()


def random_sequences(n, lo, hi, seed, vocab):
    """n token-id lists of random length in [lo, hi), ids in [2, vocab) (0 and 1 stay free
    for pad / eos), seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def tiny_marian(vocab, *, d_model, decoder_layers=1, max_positions, pad=0, eos=1, start=0,
                seed=0, dropout=0.1):
    """A seeded random MarianMTModel (one encoder layer, 2 heads, FFN 2·d_model) in eval
    mode; init_std 0.3 keeps its hidden states well separated (no kNN ties). ``dropout=0``
    for training tests that compare runs (train mode would draw dropout masks)."""
    from transformers import MarianConfig, MarianMTModel
    torch.manual_seed(seed)
    cfg = MarianConfig(vocab_size=vocab, d_model=d_model, encoder_layers=1,
                       decoder_layers=decoder_layers, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
                       decoder_ffn_dim=2 * d_model, pad_token_id=pad, eos_token_id=eos,
                       decoder_start_token_id=start, max_position_embeddings=max_positions,
                       init_std=0.3, dropout=dropout)
    return MarianMTModel(cfg).eval()


def random_pairs(vocab, n, seed):
    """``n`` seeded (source, target + [eos 1]) pairs of random ids in [2, vocab), lengths 3-7."""
    g = torch.Generator().manual_seed(seed)

    def rand():
        return torch.randint(2, vocab, (int(torch.randint(3, 8, (1,), generator=g)),),
                             generator=g).tolist()
    return [(rand(), rand() + [1]) for _ in range(n)]


def tiny_gpt2(vocab, *, n_embd, n_layer, n_positions, pad=0, eos=1, seed=0):
    """A seeded random GPT2LMHeadModel in eval mode; initializer_range 0.2 (not 0.02) keeps
    its hidden states well separated, so kNN ties (which backends may break differently) do
    not occur."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     n_positions=n_positions, pad_token_id=pad, eos_token_id=eos,
                     bos_token_id=eos, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


# ------------------------------------------------------------------ forked torch.distributed ranks

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, world, *args, deadline_s=120):
    """``target(rank, world, port, *args)`` in ``world`` spawned processes (gloo on loopback
    only), joined one by one (torch's spawn helper would kill the surviving ranks as soon as
    one dies, before they report). Fails if any rank is still running after ``deadline_s``;
    returns the exit codes (a rank killed by signal s exits with -s). ``target`` is a
    module-level function and ``args`` are picklable.

    Spawned, not forked: pytest's process has threads by then (tqdm monitors, a compile
    pool, OpenMP workers), and a child forked while one of them held a lock hangs on it
    (seen once in CI: both ranks of test_kd_ddp still running after 120 s). A rank that
    hangs dumps its Python stack to stderr shortly before the deadline."""
    import multiprocessing
    import os
    import time
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    port, ctx = free_port(), multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(target, deadline_s, r, world, port, *args))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still running after {deadline_s} s (stacks above)"
    return [p.exitcode for p in procs]


def rank_main(target, deadline_s, rank, *args):
    """One rank of ``run_ranks``: the stacks of every thread go to stderr if the rank is
    still running 5 s before the deadline (pytest shows them with the failure).

    A rank whose target returned leaves by ``os._exit(0)``, skipping interpreter teardown:
    its exit code is the target's outcome. A spawned child otherwise finalizes the
    interpreter, and torch's gloo threads, still alive when something (DDP's reducer) held
    the group past ``destroy_process_group``, have aborted there once in CI: "terminate
    called without an active exception", exit -6, after the rank had saved its results."""
    import faulthandler
    import os
    import sys
    faulthandler.dump_traceback_later(max(1, deadline_s - 5))
    target(rank, *args)
    faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_simd_script(script: str, level: str):
    """The JSON that ``script`` prints, run in a fresh interpreter with KNNFAST_SIMD=``level``
    ("auto": the AVX-512 kernel bodies where the CPU has them; "generic": the portable ones)."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env=dict(os.environ, KNNFAST_SIMD=level))
    return json.loads(proc.stdout)


def both_simd_levels(script: str):
    """(AVX-512 output, portable output) of ``script``, which prints the JSON list
    [knnfast.build_info()["simd"], *results]: run under KNNFAST_SIMD=auto and =generic, each
    checked to have used the body it asked for."""
    fast, portable = run_simd_script(script, "auto"), run_simd_script(script, "generic")
    assert fast[0] == "avx512" and portable[0] == "generic", (fast[0], portable[0])
    return fast[1:], portable[1:]
