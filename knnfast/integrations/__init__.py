"""Integrations with model frameworks: ``knnfast.integrations.hf`` (HuggingFace transformers:
datastore capture, kNN-LM evaluation, kNN generate, tuning; needs transformers). Imported on
demand, never by ``import knnfast``."""
