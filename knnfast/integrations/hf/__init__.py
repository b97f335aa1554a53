"""HuggingFace transformers drop-in: datastore capture, kNN-LM evaluation, kNN generate.

Works with any causal LM or encoder-decoder whose forward returns logits; nothing is keyed
on the model type. The LM head is the module that produces the logits, found by a probe
forward pass (``lm_head``; on FSMT ``get_output_embeddings()`` is an input embedding).
Teacher forcing runs with ``use_cache=False`` (FSMT builds no causal mask while caching), and
time-major blocks (FSMT's decoder) are captured as [B, T, D]. Which hidden state is the key
(Xu et al.'s names):

    "ffn"   the input of the LM head (the decoder's final hidden state; default)
    "att"   the input of the last decoder block's feed-forward sub-layer
    "<dotted.module.path>" or a callable(model) -> module: the input of that module

Examples (``ids`` are token-id lists; for seq2seq, (source_ids, target_ids) pairs)::

    from knnfast.integrations import hf
    ds = hf.build_datastore(model, train_examples, "ds/")                 # teacher forced
    knn = knnfast.KNNDecoder(ds, k=8, temperature=10.0, lam=0.7)
    out = hf.generate(model, knn, input_ids=src, num_beams=4)             # kNN-MT / kNN-LM
    res = hf.evaluate_lm(model, test_examples, knn)                       # base/kNN/oracle ppl
    best = hf.tune(model, dev_examples, ds, ks=(4, 8, 16))                # λ/τ/k grid
    wins, scored = hf.sliding_windows(stream_ids, window=512, stride=256)  # context windows
    res = hf.evaluate_lm(model, wins, knn, scored=scored)                  # each token once

Modules: ``capture`` (key layers, hidden-state hook, teacher forcing, ``build_datastore``),
``evaluate`` (perplexities, tuning), ``generate`` (kNN in ``model.generate``),
``output_layer`` (the head as weight and bias, and a forward pass without the logits, for
fused linear losses).
"""
from .capture import (Example, HiddenCapture, HiddenSpec, TeacherForcedBatch, build_datastore,
                      corpus_fingerprint, decoder_blocks, ffn_module, forward_batch,
                      hidden_module, is_seq2seq, length_order, lm_head, pad_batch, pad_id,
                      target_length, teacher_forced)
from .evaluate import (TUNE_KS, TUNE_LAMS, TUNE_TEMPERATURES, GoldFeatures, LMEvalResult,
                       TuneResult, base_gold_logprob, collect_gold_features, evaluate_lm,
                       scored_mask, sliding_windows, tune, tune_from_features)
from .generate import KNNLogitsProcessor, KNNModel, generate, knn_logits, knn_processor
from .output_layer import OutputLayer, output_layer

__all__ = ["Example", "HiddenCapture", "HiddenSpec", "TeacherForcedBatch", "build_datastore",
           "corpus_fingerprint", "decoder_blocks", "ffn_module", "forward_batch",
           "hidden_module", "is_seq2seq", "length_order", "lm_head", "pad_batch", "pad_id",
           "target_length", "teacher_forced", "TUNE_KS", "TUNE_LAMS", "TUNE_TEMPERATURES",
           "GoldFeatures", "LMEvalResult", "TuneResult", "base_gold_logprob",
           "collect_gold_features", "evaluate_lm", "scored_mask", "sliding_windows", "tune",
           "tune_from_features",
           "KNNLogitsProcessor", "KNNModel", "generate", "knn_logits", "knn_processor",
           "OutputLayer", "output_layer"]
