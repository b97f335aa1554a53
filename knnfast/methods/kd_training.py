"""kNN-KD training (Yang et al. 2022) over TeacherStore batches: the distillation loss on a
[B, L] batch, unfused (from the logits) or fused with the output layer (from the hidden
states, ``knnfast.knn_kd_linear_loss``: no [B, L, V] logits or gradient), a plain training
step and an HF Trainer subclass, both fused by default when the model allows it.

    loss = distillation_loss(logits, labels, teacher)                       # logits [B, L, V]
    loss = distillation_loss(hidden=h, weight=W, bias=b, labels=labels, teacher=teacher)

``knnfast.methods.kd`` re-exports every name here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import distributed, ops
from ..integrations.hf import Example, OutputLayer, output_layer

if TYPE_CHECKING:
    from .kd import TeacherStore

Teacher = Tuple[Tensor, Tensor]


def distillation_loss(logits: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                      teacher: Optional[Teacher] = None, *, hidden: Optional[Tensor] = None,
                      weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                      compact: bool = False, temperature: float = 100.0,
                      ce_weight: float = 1.0, kd_weight: float = 1.0,
                      label_smoothing: float = 0.1, ignore_index: int = -100, kd: str = "kl",
                      reduction: str = "mean") -> Tensor:
    """knn_kd_loss over a [B, L] batch: labels [B, L], teacher = a TeacherStore.batch(...)
    pair ([B, L, k] tokens and scores, or probabilities when ``compact``), and either
    ``logits`` [B, L, V] or the output layer's input ``hidden`` [B, L, D] with its ``weight``
    [V, D] (and ``bias`` [V]): then knnfast.knn_kd_linear_loss gives the same value and
    gradients without the logits. Defaults follow the released code: LS-CE(0.1) + 1.0 * KL,
    tau = 100."""
    x = _student(logits, hidden, weight, bias)
    if labels is None or teacher is None:
        raise ValueError("distillation_loss: labels and teacher are required")
    tokens, values = (t.to(x.device) for t in teacher)
    if tokens.shape[:2] != labels.shape or x.shape[:2] != labels.shape:
        name = "logits" if logits is not None else "hidden"
        raise ValueError(f"distillation_loss: {name} {tuple(x.shape)}, labels "
                         f"{tuple(labels.shape)} and teacher {tuple(tokens.shape)} must share [B, L]")
    flat = dict(teacher_probs=values.flatten(0, 1)) if compact else dict(
        teacher_scores=values.flatten(0, 1), temperature=temperature)
    flat.update(ce_weight=ce_weight, kd_weight=kd_weight, label_smoothing=label_smoothing,
                ignore_index=ignore_index, kd=kd, reduction=reduction)
    if logits is not None:
        return ops.knn_kd_loss(logits.flatten(0, 1), labels.flatten(), tokens.flatten(0, 1),
                               **flat)
    return ops.knn_kd_linear_loss(hidden.flatten(0, 1), weight, labels.flatten(),
                                  tokens.flatten(0, 1), bias=bias, **flat)


def _student(logits: Optional[Tensor], hidden: Optional[Tensor], weight: Optional[Tensor],
             bias: Optional[Tensor]) -> Tensor:
    """The student side of distillation_loss: logits, or hidden with weight (and bias)."""
    if logits is not None and (hidden is not None or weight is not None or bias is not None):
        raise ValueError("distillation_loss: give logits, or hidden= with weight= (and bias=), "
                         "not both")
    if logits is not None:
        return logits
    if hidden is None or weight is None:
        raise ValueError("distillation_loss: give logits [B, L, V], or hidden=[B, L, D] with "
                         "weight=[V, D] (and bias=[V]); got "
                         + ("weight without hidden" if weight is not None else
                            "hidden without weight" if hidden is not None else "neither"))
    return hidden


def fused_layer(model: nn.Module, fused: Optional[bool]) -> Optional[OutputLayer]:
    """The output layer the fused loss trains through: None when ``fused`` is False, or when
    it is None (automatic) and ``knnfast.integrations.hf.output_layer`` cannot use the model
    (its logits are not hidden @ W.T + b, or its probe forward pass fails: the logits path
    still works for such models); with True that case raises."""
    if fused is False:
        return None
    try:
        return output_layer(model)
    except Exception:
        if fused:
            raise
        return None


def batch_loss(model: nn.Module, inputs: dict, labels: Tensor, teacher: Teacher, *,
               compact: bool, layer: Optional[OutputLayer], **loss_kwargs) -> Tuple[Tensor, Any]:
    """(distillation loss, the model's output) of one batch: through ``layer`` (fused; the
    output's logits are an empty [B, 0, V]) or, with ``layer`` None, from the logits."""
    if layer is None:
        outputs = model(**inputs)
        return distillation_loss(outputs.logits, labels, teacher, compact=compact,
                                 **loss_kwargs), outputs
    hidden, outputs = layer.forward(model, **inputs)
    return distillation_loss(hidden=hidden, weight=layer.weight, bias=layer.bias(model),
                             labels=labels, teacher=teacher, compact=compact,
                             **loss_kwargs), outputs


def seq2seq_batch(examples: Sequence[Example], ids: Sequence[int], pad_id: int = 0,
                  start_id: int = 0, ignore_index: int = -100) -> dict:
    """Model inputs of sentences ``ids``: input_ids, attention_mask, decoder_input_ids and
    labels (pads = ignore_index), aligned with TeacherStore.batch(ids)."""
    src = [list(examples[i][0]) for i in ids]
    tgt = [list(examples[i][1]) for i in ids]
    S, L = max(map(len, src)), max(map(len, tgt))
    input_ids = torch.full((len(ids), S), pad_id, dtype=torch.long)
    labels = torch.full((len(ids), L), ignore_index, dtype=torch.long)
    for b, (s, t) in enumerate(zip(src, tgt)):
        input_ids[b, :len(s)] = torch.tensor(s)
        labels[b, :len(t)] = torch.tensor(t)
    decoder_input_ids = torch.cat([torch.full((len(ids), 1), start_id, dtype=torch.long),
                                   labels[:, :-1].masked_fill(labels[:, :-1] == ignore_index, pad_id)], 1)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(),
            "decoder_input_ids": decoder_input_ids, "labels": labels}


def rank_slice(ids: Sequence[int], group: Any = None) -> List[int]:
    """This rank's contiguous share of a global batch of sentence ids (shares differ in size
    by at most one; all of ``ids`` without a process group). Data-parallel kNN-KD: every rank
    draws the same global batch, trains its DDP replica on its share, and
    ``TeacherStore.batch`` reads only those sentences' teacher rows from the memmap.

    DDP averages the ranks' gradients, and ``train_step``'s loss is a mean over the rank's
    target tokens, so the update equals one process training on the whole batch only when
    the shares hold equal token counts; otherwise use ``reduction="sum"`` and scale each
    rank's loss by world size / the global batch's token count."""
    rank, world = distributed.rank_and_world(group)
    start, end = distributed.split(len(ids), rank, world)
    return list(ids)[start:end]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, examples: Sequence[Example],
               ids: Sequence[int], store: Optional["TeacherStore"], *,
               fused: Optional[bool] = None, **loss_kwargs) -> float:
    """One update of a plain training loop: kNN-KD when ``store`` is given, else
    label-smoothed CE through the same loss (kd_weight 0). Returns the loss. ``model``
    may be wrapped in ``DistributedDataParallel`` (see ``rank_slice``). ``fused`` (default
    None: whenever the model allows it, see ``fused_layer``) trains through the output layer
    without the [B, L, V] logits; False computes the logits."""
    cfg = getattr(model, "module", model).config  # DDP keeps the HF model in .module
    batch = seq2seq_batch(examples, ids, cfg.pad_token_id or 0,
                          cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else 0)
    labels = batch.pop("labels")
    if store is not None:
        teacher, compact = store.batch(ids, length=labels.shape[1]), store.compact
    else:
        k0 = torch.full((*labels.shape, 1), -1, dtype=torch.long)
        teacher, compact = (k0, torch.zeros(k0.shape)), True
        loss_kwargs = dict(loss_kwargs, kd_weight=0.0)
    loss, _ = batch_loss(model, batch, labels, teacher, compact=compact,
                         layer=fused_layer(model, fused), **loss_kwargs)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def knn_kd_trainer_class(base=None):
    """An HF ``Trainer`` subclass (``Seq2SeqTrainer`` by default) whose ``compute_loss`` uses
    the teacher store: the dataset yields dicts with a ``sentence_ids`` entry, and the
    trainer needs ``remove_unused_columns=False``. ``fused`` (default None: whenever the model
    allows it) computes the training loss through the output layer without the logits;
    ``compute_loss(..., return_outputs=True)`` (evaluation with predictions) and
    ``fused=False`` compute the logits. Where the Trainer counts ``num_items_in_batch``
    (the target tokens of all accumulated micro-batches, across ranks by default), the loss is
    summed and divided by it, as the Trainer does for the model's own loss, so gradient
    accumulation and ranks holding different numbers of tokens give the update of one batch
    holding them all; otherwise it is the micro-batch's mean over its target tokens.

        Trainer = knnfast.methods.kd.knn_kd_trainer_class()
        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                          teacher_store=store, kd_kwargs=dict(temperature=100.0))
    """
    if base is None:
        from transformers import Seq2SeqTrainer as base

    class KNNKDTrainer(base):
        def __init__(self, *args, teacher_store: "TeacherStore",
                     kd_kwargs: Optional[dict] = None, fused: Optional[bool] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher_store = teacher_store
            self.kd_kwargs = kd_kwargs or {}
            self.fused = fused
            if fused:
                output_layer(self.model)  # a model that cannot: the ValueError now, not later

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            ids = inputs.pop("sentence_ids").tolist()
            labels = inputs.pop("labels")
            teacher = self.teacher_store.batch(ids, length=labels.shape[1])
            layer = None if return_outputs else fused_layer(model, self.fused)
            per_item = num_items_in_batch is not None and self.model_accepts_loss_kwargs
            kwargs = dict(self.kd_kwargs, reduction="sum") if per_item else self.kd_kwargs
            loss, outputs = batch_loss(model, inputs, labels, teacher,
                                       compact=self.teacher_store.compact, layer=layer,
                                       **kwargs)
            if per_item:
                loss = loss / num_items_in_batch * self.item_scale()
            return (loss, outputs) if return_outputs else loss

        def item_scale(self) -> int:
            """What the Trainer multiplies a loss normalized by num_items_in_batch with: the
            ranks, when it counts tokens across them (DDP then averages the gradients)."""
            if not self.args.average_tokens_across_devices:
                return 1
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            return self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu

    return KNNKDTrainer
