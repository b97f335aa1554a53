"""INK (2023) building blocks for HF models: bottleneck adapters after every transformer block
and the output-projection-only (OPL) baseline of the meta-optimizer paper.

    adapters = knnfast.ink.add_adapters(model, size=64)     # only adapters train from here on
    ...                                                     # training loop (ink_loss, issue 6)
    knnfast.ink.remove_adapters(model)                      # back to the original model

Each adapter maps a block's output x to x + Dropout(up(ReLU(down(LayerNorm(x))))) (INK's
released code, after each FFN block, post-LN, encoder and decoder). `up` starts at zero, so a
freshly adapted model computes exactly what the original model computed.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

ADAPTERS_ATTR = "knnfast_adapters"


class Adapter(nn.Module):
    """LayerNorm -> Linear(d, size) -> ReLU -> Linear(size, d) -> Dropout, added residually."""

    def __init__(self, d_model: int, size: int = 64, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.down = nn.Linear(d_model, size)
        self.up = nn.Linear(size, d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.up(torch.relu(self.down(self.norm(x)))))


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """Every transformer block of the model: the encoder's and the decoder's (the ModuleLists
    of identical modules holding most parameters under each), found without a model list."""
    from .hf import decoder_blocks
    blocks = list(decoder_blocks(model))
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        lists = [m for m in model.get_encoder().modules()
                 if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
        if lists:
            blocks = list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) + blocks
    return blocks


def _hidden_size(model: nn.Module) -> int:
    cfg = model.config
    for name in ("d_model", "hidden_size", "n_embd"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise ValueError("cannot tell the model width: config has no d_model / hidden_size / n_embd")


def add_adapters(model: nn.Module, size: int = 64, dropout: float = 0.1,
                 freeze: bool = True) -> nn.ModuleList:
    """Insert an Adapter after every transformer block (a forward hook rewrites the block's
    hidden-state output) and, with ``freeze``, make only adapter parameters trainable. The
    adapters live in ``model.knnfast_adapters`` (saved and moved with the model)."""
    if hasattr(model, ADAPTERS_ATTR):
        raise ValueError("add_adapters: this model already has knnfast adapters")
    if size <= 0:
        raise ValueError(f"add_adapters: size must be > 0, got {size}")
    blocks = transformer_blocks(model)
    d = _hidden_size(model)
    param = next(model.parameters())
    adapters = nn.ModuleList(Adapter(d, size, dropout) for _ in blocks).to(param.device, param.dtype)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    setattr(model, ADAPTERS_ATTR, adapters)
    handles = []
    for block, adapter in zip(blocks, adapters):
        def hook(module, args, output, adapter=adapter):
            if isinstance(output, tuple):
                return (adapter(output[0]),) + output[1:]
            return adapter(output)
        handles.append(block.register_forward_hook(hook))
    adapters._knnfast_handles = handles
    return adapters


def remove_adapters(model: nn.Module, unfreeze: bool = True) -> None:
    """Remove the adapters (and their hooks); ``unfreeze`` makes the model trainable again."""
    adapters = getattr(model, ADAPTERS_ATTR, None)
    if adapters is None:
        raise ValueError("remove_adapters: the model has no knnfast adapters")
    for h in adapters._knnfast_handles:
        h.remove()
    delattr(model, ADAPTERS_ATTR)
    if unfreeze:
        for p in model.parameters():
            p.requires_grad_(True)


def output_projection_only(model: nn.Module) -> List[nn.Parameter]:
    """OPL baseline: freeze everything but the output projection (and its bias). A projection
    tied to the input embeddings is untied first, so training it leaves the embeddings as they
    were. Returns the trainable parameters."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError("output_projection_only: the model has no output projection")
    embed = model.get_input_embeddings()
    if embed is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [head.weight]
    if getattr(head, "bias", None) is not None:
        trainable.append(head.bias)
    # Marian / BART keep an extra output bias as a buffer; it stays fixed (not a parameter)
    for p in trainable:
        p.requires_grad_(True)
    return trainable


# --------------------------------------------------------------------------- Xu et al. §4


class MultiEmbeddingSoftmax(nn.Module):
    """The learned alternative to a datastore (Xu et al., "Why do Nearest Neighbor Language
    Models Work?", §4): n output embeddings per word type, a softmax over all V·n of them,
    the probability of a word the sum over its n embeddings:

        log p(v | h) = logsumexp_i (h · w_{v,i} + b_{v,i}) - logsumexp_{u,i} (h · w_{u,i} + b_{u,i})

    Trained on frozen features (the "att" or "ffn" state of a fixed model) with ``fit``,
    optionally through the interpolated loss -log((1 - λ) p_LM(y) + λ p(y)).
    """

    def __init__(self, d_model: int, vocab_size: int, n: int = 2, init_from: torch.Tensor = None):
        super().__init__()
        if n < 1:
            raise ValueError(f"MultiEmbeddingSoftmax: n must be >= 1, got {n}")
        self.n, self.vocab_size = n, vocab_size
        self.weight = nn.Parameter(torch.randn(vocab_size * n, d_model) * d_model ** -0.5)
        self.bias = nn.Parameter(torch.zeros(vocab_size * n))
        if init_from is not None:  # start from the LM's output embedding (+ small noise)
            with torch.no_grad():
                self.weight.copy_(init_from.repeat_interleave(n, 0)
                                  + 1e-3 * torch.randn_like(self.weight))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """log p(v | h): [T, D] -> [T, V] float32."""
        z = torch.nn.functional.linear(hidden.float(), self.weight, self.bias)
        per_word = torch.logsumexp(z.view(-1, self.vocab_size, self.n), dim=-1)
        return per_word - torch.logsumexp(z, dim=-1, keepdim=True)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor,
             base_gold_logp: torch.Tensor = None, lam: float = 0.25) -> torch.Tensor:
        """Mean NLL of targets; with ``base_gold_logp`` [T] (the LM's log p(y)), the
        interpolated loss -log((1 - lam) p_LM(y) + lam p(y))."""
        gold = self.forward(hidden).gather(1, targets[:, None].long()).squeeze(1)
        if base_gold_logp is None:
            return -gold.mean()
        if not 0.0 < lam < 1.0:
            raise ValueError(f"lam must be in (0, 1) for the interpolated loss, got {lam}")
        mixed = torch.logaddexp(torch.log1p(torch.tensor(-lam)) + base_gold_logp.float(),
                                torch.log(torch.tensor(lam)) + gold)
        return -mixed.mean()

    def fit(self, hidden: torch.Tensor, targets: torch.Tensor, *, base_gold_logp=None,
            lam: float = 0.25, epochs: int = 5, batch_size: int = 256, lr: float = 1e-3,
            seed: int = 0) -> list:
        """Adam on frozen features; returns the loss of every update."""
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        hidden, targets = hidden.detach(), targets.detach()
        losses = []
        for _ in range(epochs):
            order = torch.randperm(hidden.shape[0], generator=gen)
            for s in range(0, len(order), batch_size):
                rows = order[s:s + batch_size]
                base = None if base_gold_logp is None else base_gold_logp[rows]
                loss = self.loss(hidden[rows], targets[rows], base, lam)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses


# --------------------------------------------------------------------------- fused ink_loss


class _LogitsLoss(torch.autograd.Function):
    """L_a + alpha L_i over logits = hidden W^T + b, with the kNN weights w held fixed.

    Forward computes the GEMM, the per-row losses (knn_kd_loss: one read of the logits) and
    log p at the neighbour tokens, then overwrites the logits buffer with d loss / d logits
    (knn_kd_loss_grad_), so one [B, V] buffer serves both directions. Backward only scales it
    and runs the two GEMMs for hidden and the output weight."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tokens, w, alpha, eps, ignore_index, count):
        from . import ops
        logits = torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()
        tau = torch.ones(1, device=hidden.device)
        args = (targets, tokens, None, w, tau, 1.0, float(alpha), float(eps), int(ignore_index))
        rows = torch.ops.knnfast.knn_kd_loss(logits, *args, True)
        live = targets != ignore_index
        y = targets.masked_fill(~live, 0)
        no_nbr = torch.full((logits.shape[0], 1), -1, dtype=torch.long, device=logits.device)
        gold = ops.knn_gold_logprob(logits, y, no_nbr, weights=torch.zeros(no_nbr.shape,
                                                                          device=logits.device),
                                    lam=0.0)
        lse = logits.gather(1, y[:, None]).squeeze(1) - gold
        logp_nbr = logits.gather(1, tokens.clamp(min=0)) - lse[:, None]
        torch.ops.knnfast.knn_kd_loss_grad_(logits, live.float() / count, *args)
        ctx.save_for_backward(logits, hidden, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(logp_nbr)
        return rows.sum() / count, logp_nbr

    @staticmethod
    def backward(ctx, g_loss, _g_logp):
        grad_logits, hidden, weight = ctx.saved_tensors
        # scale in place: a second [B, V] buffer is exactly what this function avoids
        g = grad_logits if bool(g_loss == 1) else grad_logits.mul_(g_loss)
        g_hidden = g @ weight if ctx.needs_input_grad[0] else None
        g_weight = g.t() @ hidden if ctx.needs_input_grad[1] else None
        g_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return g_hidden, g_weight, g_bias, None, None, None, None, None, None, None


def ink_loss(hidden: torch.Tensor, out_weight: torch.Tensor, targets: torch.Tensor,
             nbr_keys: torch.Tensor, nbr_tokens: torch.Tensor, *, alpha: float = 0.1,
             beta: float = 0.1, out_bias: torch.Tensor = None, ignore_index: int = -100,
             variant: str = "paper", detach_knn: bool = False, reference_k: int = 8):
    """INK loss L_a + alpha L_i + beta L_r, mean over the counted rows (DESIGN §6; the same
    contract as knnfast.reference.ink_loss with reduction="mean"), fused: the only [B, V]
    buffer is the logits, which become their own gradient (see _LogitsLoss). The kNN side
    ([B, k] cosine kernels, p_kNN merged per token, L_r) is small PyTorch code; the gradient
    through p_kNN enters via a surrogate with the value 0. Returns (loss, {"align", "kd",
    "refine"}) with the parts detached."""
    from . import reference
    if variant not in ("paper", "reference"):
        raise ValueError(f"ink_loss: variant must be 'paper' or 'reference', got {variant!r}")
    if hidden.dtype != torch.float32 or out_weight.dtype != torch.float32:
        # the fused path works in float32; other dtypes take the reference path
        return reference.ink_loss(hidden, out_weight, targets, nbr_keys, nbr_tokens, alpha=alpha,
                                  beta=beta, out_bias=out_bias, ignore_index=ignore_index,
                                  variant=variant, detach_knn=detach_knn, reference_k=reference_k)
    B = hidden.shape[0]
    if nbr_keys.dim() != 3 or nbr_keys.shape[:2] != nbr_tokens.shape or nbr_keys.shape[2] != hidden.shape[1]:
        raise ValueError(f"ink_loss: nbr_keys must have shape [{B}, k, {hidden.shape[1]}] "
                         f"matching nbr_tokens, got {tuple(nbr_keys.shape)} and {tuple(nbr_tokens.shape)}")
    for name, val in (("alpha", alpha), ("beta", beta)):
        if not float(val) >= 0:
            raise ValueError(f"ink_loss: {name} must be a finite number >= 0, got {val}")
    targets = targets.long()
    tokens = nbr_tokens.long()
    live = targets != ignore_index
    count = live.sum().clamp(min=1).float()
    eps = 0.1 if variant == "reference" else 0.0

    valid = tokens >= 0
    cos = torch.nn.functional.cosine_similarity(hidden[:, None, :], nbr_keys.float(), dim=-1,
                                                eps=1e-8)
    z = cos if variant == "paper" else torch.exp(cos)
    kd_valid = valid.clone()
    if variant == "reference":
        kd_valid[:, reference_k:] = False
    has = kd_valid.any(dim=1, keepdim=True)
    w = torch.softmax(torch.where(has, z.masked_fill(~kd_valid, float("-inf")), 0.0), 1) * kd_valid

    loss_ai, logp_nbr = _LogitsLoss.apply(hidden, out_weight, out_bias, targets, tokens,
                                          w.detach(), float(alpha), eps, ignore_index, count)
    # p_kNN at each slot's token (duplicates merged) and the L_i gradient through w:
    # d L_i / d w_j = log P(t_j) + 1 - log p(t_j); the +1 sums to 0 over a softmax.
    same = (tokens[:, :, None] == tokens[:, None, :]) & kd_valid[:, None, :]
    p_tok = (w.detach()[:, None, :] * same).sum(-1)
    kd_part = ((w.detach() * (torch.log(p_tok.clamp_min(1e-38)) - logp_nbr)) * kd_valid).sum(1)
    surrogate = torch.zeros((), device=hidden.device)
    if not detach_knn and alpha > 0:
        coef = (torch.log(p_tok.clamp_min(1e-38)) - logp_nbr) * kd_valid * live[:, None]
        surrogate = alpha * ((w * coef).sum() - (w * coef).sum().detach()) / count

    match = valid & (tokens == targets.masked_fill(~live, 0)[:, None])
    any_match = match.any(dim=1, keepdim=True)
    den = torch.logsumexp(torch.where(any_match, cos.masked_fill(~valid, float("-inf")), 0.0), 1)
    num = torch.logsumexp(torch.where(any_match, cos.masked_fill(~match, float("-inf")), 0.0), 1)
    refine = torch.where(any_match[:, 0] & live, den - num, torch.zeros_like(den))
    loss = loss_ai + surrogate + beta * refine.sum() / count
    kd_mean = float((kd_part * live).sum() / count)
    parts = {"kd": kd_mean, "refine": float(refine.detach().sum() / count),
             "align": float(loss_ai.detach()) - alpha * kd_mean}
    return loss, parts


# --------------------------------------------------------------------------- INK training loop


def _output_layer(model: nn.Module):
    """(output weight [V, D], output bias [V] or None) of the LM head, frozen."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    extra = getattr(model, "final_logits_bias", None)  # Marian / BART add it to the logits
    if extra is not None:
        extra = extra.reshape(-1)
        bias = extra if bias is None else bias + extra
    return head.weight.detach(), None if bias is None else bias.detach()


def train_ink(model: nn.Module, examples, workdir: str, *, epochs: int = 1,
              batch_size: int = 16, k: int = 32, alpha: float = 0.1, beta: float = 0.1,
              lr: float = 1e-3, adapter_size: int = 64, dropout: float = 0.1,
              variant: str = "paper", seed: int = 0, index_factory: str = None,
              nprobe: int = 16, progress: bool = True, log=print):
    """INK (2023): refine the representation space with adapters against kNN knowledge.

    Every epoch re-encodes the datastore keys with the current adapters (teacher-forced
    capture of ``examples``, the "ffn" state), then for every training batch retrieves the k
    nearest entries of each position with its own entry excluded and minimizes ink_loss with
    only the adapters trainable. A checkpoint (adapters, optimizer, epoch) is written after
    each epoch to ``workdir/ink_ckpt.pt``; calling again with more epochs resumes there.
    With ``index_factory`` (e.g. "IVF1024,PQ32") retrieval goes through FAISS (exact scores
    of the candidates): the quantizers are trained once, on the first epoch's keys, and reused
    for every refreshed datastore (INK's released code does the same). Returns a per-epoch log.
    Afterwards the model decodes with no datastore, or with one
    (``knnfast.hf.build_datastore`` on the adapted model + a KNNDecoder: hybrid).
    """
    import os
    from tqdm.auto import tqdm
    from . import hf
    os.makedirs(workdir, exist_ok=True)
    if not hasattr(model, ADAPTERS_ATTR):
        add_adapters(model, size=adapter_size, dropout=dropout)
    adapters = getattr(model, ADAPTERS_ATTR)
    opt = torch.optim.Adam(adapters.parameters(), lr=lr)
    ckpt_path = os.path.join(workdir, "ink_ckpt.pt")
    history, start = [], 0
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False)
        adapters.load_state_dict(state["adapters"])
        opt.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
        log(f"INK: resuming after epoch {start}")
    order = hf.length_order(examples)
    lengths = [len(examples[i][1]) if isinstance(examples[i], tuple) else len(examples[i]) - 1
               for i in order]
    entry_start = [0]
    for n in lengths[:-1]:
        entry_start.append(entry_start[-1] + n)
    weight, bias = _output_layer(model)
    pad = hf._pad_id(model)
    seq2seq = hf._is_seq2seq(model)
    for epoch in range(start, epochs):
        model.eval()
        ds = hf.build_datastore(model, examples, os.path.join(workdir, "datastore"),
                                overwrite=True, resume=False, progress=False)
        if index_factory:
            _refresh_index(ds, index_factory, nprobe, os.path.join(workdir, "ink_index.faiss"))
        model.train()
        gen = torch.Generator().manual_seed(seed + epoch)
        batches = [list(range(s, min(s + batch_size, len(order))))
                   for s in range(0, len(order), batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        sums = {"loss": 0.0, "align": 0.0, "kd": 0.0, "refine": 0.0}
        bar = tqdm(batches, desc=f"INK epoch {epoch + 1}", disable=not progress, leave=False)
        for slots in bar:
            batch = [examples[order[s]] for s in slots]
            with hf.HiddenCapture(model, "ffn") as cap:
                fwd = hf._seq2seq_forward if seq2seq else hf._causal_forward
                _, targets, mask = fwd(model, batch, pad, weight.device)
                keep = mask.bool()
                hidden = cap.last[keep]
            targets = targets[keep]
            # entry ids of these positions in the datastore (same length order as the capture)
            ids = torch.cat([torch.arange(entry_start[s], entry_start[s] + lengths[s]) for s in slots])
            _, nbr = ds.search(hidden.detach(), k, exact=not index_factory, rescore=True,
                               exclude=ids)
            tokens = ds.lookup(nbr, check=False)
            keys = ds.keys[nbr.clamp(min=0)].float()
            loss, parts = ink_loss(hidden, weight, targets, keys, tokens, alpha=alpha, beta=beta,
                                   out_bias=bias, variant=variant)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums["loss"] += float(loss.detach())
            for name in ("align", "kd", "refine"):
                sums[name] += parts[name]
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        model.eval()
        entry = {name: v / max(1, len(batches)) for name, v in sums.items()}
        entry["epoch"] = epoch + 1
        history.append(entry)
        log(f"INK epoch {epoch + 1}: loss {entry['loss']:.4f} (align {entry['align']:.4f}, "
            f"kd {entry['kd']:.4f}, refine {entry['refine']:.4f})")
        tmp = ckpt_path + ".tmp"
        torch.save({"adapters": adapters.state_dict(), "optimizer": opt.state_dict(),
                    "epoch": epoch + 1, "history": history}, tmp)
        os.replace(tmp, ckpt_path)
    return history


def _refresh_index(ds, factory: str, nprobe: int, template_path: str) -> None:
    """Fill the datastore's index from a template trained once (first call trains it)."""
    import os
    import faiss
    from .datastore import _Index, _faiss_rows, _row_chunks, _set_nprobe
    if not os.path.exists(template_path):
        ds.build_index(factory, nprobe=nprobe, save=False, progress=False)
        template = faiss.clone_index(ds._index.index)
        template.reset()
        faiss.write_index(template, template_path)
    index = faiss.read_index(template_path)
    for s, e in _row_chunks(len(ds), ds.dim * ds.keys.element_size()):
        index.add(_faiss_rows(ds.keys[s:e], ds.metric))
    _set_nprobe(index, nprobe)
    ds._index = _Index(index, {"factory": factory, "metric": ds.metric, "ntotal": len(ds),
                               "nprobe": nprobe})
