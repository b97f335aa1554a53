"""knnfast: fused kNN kernels for retrieval-augmented decoding (kNN-MT, kNN-LM) in PyTorch.

    import knnfast
    scores, ids = knnfast.knn_search(queries, keys, k=8)             # exact, fused top-k
    logp = knnfast.knn_interpolate(logits, values[ids], scores=scores,
                                   temperature=10.0, lam=0.25)      # log((1-λ)p_LM + λ p_kNN)

Every op is registered as ``torch.ops.knnfast.<op>`` (works with torch.compile and
torch.library.opcheck) and has a pure-PyTorch twin in ``knnfast.reference``.

Layers, each importing only those before it (ARCHITECTURE.md): ``defaults``; ``ops`` and
``reference`` (kernels); ``storage`` (datastore); ``methods.decoding``; ``integrations.hf``;
the other ``methods`` (kNN-KD, INK, analysis). ``app`` (CLI, demo) is the application and is
never imported by the library.
"""
from ._version import __version__
from . import ops  # noqa: F401  (loads the library, registers fake kernels)
from .ops import *  # noqa: F401,F403  (the ops, build_info)
from .storage import Datastore, DatastoreError, DatastoreWriter
from .methods.decoding import AdaptiveKNNDecoder, KNNDecoder, Neighbours
from .methods.ink.loss import ink_loss
from .methods.robust import RobustKNNDecoder
from .methods.skipping import RetrievalSkip

__all__ = ["__version__", *ops.__all__, "Datastore", "DatastoreError", "DatastoreWriter",
           "KNNDecoder", "AdaptiveKNNDecoder", "RobustKNNDecoder", "Neighbours", "RetrievalSkip", "ink_loss"]
