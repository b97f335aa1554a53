"""Methods built on the ops and the storage layer:

- ``decoding``: ``KNNDecoder`` (kNN-MT / kNN-LM step), ``AdaptiveKNNDecoder`` (meta-k network),
  ``Neighbours``, ``gold_two_column``
- ``skipping``: ``RetrievalSkip`` (which rows of a step search: confidence threshold and/or
  gate), ``SkipStats``; ``gate``: He et al. 2021's learned retrieval gate (``RetrievalGate``,
  ``fit_gate``, ``collect_gate_features``)
- ``kd``: kNN-KD teacher stores, the distillation loss over batches, a training step and an
  HF Trainer subclass
- ``ink``: INK adapters, the fused ``ink_loss`` and the training loop
- ``multi_embedding``: ``MultiEmbeddingSoftmax`` (Xu et al. §4)
- ``analysis``: the source papers' retrieval analyses (numbers; plots live in the app)

``kd``, ``ink.train`` and ``analysis`` run HF models through ``knnfast.integrations.hf``
(teacher-forced capture); ``decoding`` and ``ink_loss`` are framework-free. Submodules are
imported on demand.
"""
