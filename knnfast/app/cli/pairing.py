"""Where a model meets a datastore (and its index): every mismatch the files record is
checked before any work, naming both sides and the meta.json field; k is fitted to the
datastore; the decoder is built from the options."""
from __future__ import annotations

import os

from .errors import DataError, UsageError, from_library, warn
from .loading import tokenizer_fingerprint

UNKNOWN_LAYERS = (None, "", "unknown", "custom")
REBUILD = "rebuild the datastore with this model: knnfast build-datastore --model M --corpus C --out D"


def key_layer(args, ds) -> str:
    """The key layer: --hidden, else meta.json's "hidden" (which a datastore built from
    Python with Datastore.create may not know)."""
    recorded = ds.meta.get("hidden")
    given = getattr(args, "hidden", None)
    if given:
        if recorded not in UNKNOWN_LAYERS and given != recorded:
            warn(f"--hidden {given!r} overrides {ds.path}/meta.json field \"hidden\" "
                 f"({recorded!r})")
        return given
    if recorded in UNKNOWN_LAYERS:
        raise DataError(f"{ds.path}/meta.json field \"hidden\" is {recorded!r}: the layer its "
                        f"keys were captured from is not recorded",
                        "pass --hidden ffn, --hidden att or --hidden <module path>")
    return recorded


def _key_width(model, hidden: str, source: str):
    from ...integrations import hf
    try:
        module = hf.hidden_module(model, hidden)
    except ValueError as e:
        raise DataError(f"key layer {hidden!r} ({source}) is not in {type(model).__name__}: "
                        f"{str(e).splitlines()[0]}",
                        "pass --hidden ffn, --hidden att or a module path of this model") from None
    width = getattr(module, "in_features", None)
    if width is None and hidden in ("ffn", "att"):
        width = getattr(model.config, "hidden_size", None)
    return width


def check_pairing(args, model, tokenizer, ds) -> str:
    """Refuse a datastore that does not fit the model: key width (meta.json "dim"),
    vocabulary ("vocab_size"), tokenizer (extra.tokenizer_sha256, when recorded), key layer
    ("hidden"). Returns the key layer."""
    from ...integrations import hf
    hidden = key_layer(args, ds)
    source = "--hidden" if getattr(args, "hidden", None) else 'meta.json field "hidden"'
    width = _key_width(model, hidden, source)
    wanted = getattr(ds, "query_dim", ds.dim)  # a reduced store projects the model's states
    if width is not None and width != wanted:
        keys = (f"{ds.dim}-dim keys (meta.json field \"dim\")" if wanted == ds.dim else
                f"{ds.dim}-dim keys projected from {wanted}-dim states")
        raise DataError(f"datastore {ds.path} has {keys} but model {args.model} has "
                        f"{width}-dim states at key layer {hidden!r}", REBUILD)
    vocab = int(hf.lm_head(model).weight.shape[0])
    if ds.vocab_size is not None and ds.vocab_size != vocab:
        raise DataError(f"datastore {ds.path} has a vocabulary of {ds.vocab_size} tokens "
                        f"(meta.json field \"vocab_size\") but model {args.model} has "
                        f"{vocab}", REBUILD)
    recorded = ds.meta.get("extra", {}).get("tokenizer_sha256")
    if recorded and recorded != tokenizer_fingerprint(tokenizer):
        raise DataError(f"datastore {ds.path} was built with another tokenizer (meta.json field "
                        f"extra.tokenizer_sha256) than model {args.model}'s", REBUILD)
    built_with = ds.meta.get("model_id")
    if built_with and os.path.isdir(built_with) and \
            os.path.realpath(built_with) != os.path.realpath(args.model):
        warn(f"datastore {ds.path} was built with model {built_with} (meta.json field "
             f"\"model_id\"); using {args.model}")
    return hidden


def check_index(args, ds) -> None:
    """--index needs a saved index; an index built for another metric is said."""
    if not getattr(args, "index", False):
        return
    if not ds.has_saved_index():
        raise DataError(f"--index given but {ds.path} has no index",
                        f"run `knnfast build-index {ds.path}` first")
    import json
    with open(os.path.join(ds.path, "index.json")) as f:
        metric = json.load(f).get("metric")
    if metric != ds.metric:
        warn(f"the index of {ds.path} was built for metric {metric!r} (index.json) but the "
             f"datastore's keys for {ds.metric!r} (meta.json field \"metric\"); scores follow "
             f"the index")


def searched_by_lists(args, ds):
    """--lists: the datastore in RAM with its IVF index's lists searched by the fused
    kernel (Datastore.use_lists)."""
    if not getattr(args, "index", False):
        raise UsageError("--lists searches the FAISS index's lists", "add --index")
    try:
        return (ds.to("cpu") if ds.is_memmapped else ds).use_lists()
    except (OSError, ValueError) as e:
        raise from_library(e, "--lists: ") from None


def fit_k(k: int, ds, option: str = "--k") -> int:
    """k clamped to the datastore's size, with a warning: the extra neighbours would be
    padding (-1) that adds nothing but work."""
    if k > len(ds):
        warn(f"{option} {k} is more than the {len(ds)} entries of {ds.path}; using k = {len(ds)}")
        return len(ds)
    return k


def make_decoder(args, datastore):
    """The decoder the options ask for (kNN-MT/kNN-LM, adaptive or robust)."""
    check_index(args, datastore)
    if getattr(args, "lists", False):
        datastore = searched_by_lists(args, datastore)
    from ...methods.decoding import AdaptiveKNNDecoder, KNNDecoder
    # --index: the FAISS index; otherwise exact search, even when index.faiss exists
    exact = not getattr(args, "index", False)
    decoder = None
    for option, load in (("adaptive", lambda d: AdaptiveKNNDecoder.load(d, datastore, exact=exact)),
                         ("robust", lambda d: _robust(d, datastore, exact))):
        directory = getattr(args, option, None)
        if directory:
            try:
                decoder = load(directory)
            except (OSError, ValueError, KeyError) as e:
                raise from_library(e, f"--{option} {directory!r}: ") from None
            break
    if decoder is None:
        decoder = KNNDecoder(datastore, k=fit_k(args.k, datastore), temperature=args.temperature,
                             lam=args.lam, exact=exact, backend=args.backend)
    decoder.skip = make_skip(args, datastore)  # every decoder takes it
    return decoder


def make_skip(args, datastore):
    """The RetrievalSkip of --skip-confidence / --gate / --gate-threshold (None: no skipping)."""
    confidence, gate_dir = getattr(args, "skip_confidence", None), getattr(args, "gate", None)
    threshold = getattr(args, "gate_threshold", None)
    if threshold is not None and not gate_dir:
        raise UsageError("--gate-threshold applies to a learned gate", "add --gate DIR")
    if confidence is None and not gate_dir:
        return None
    from ...methods.gate import RetrievalGate
    from ...methods.skipping import RetrievalSkip
    gate = None
    if gate_dir:
        try:
            gate = RetrievalGate.load(gate_dir, datastore)
        except (OSError, ValueError, KeyError) as e:
            raise from_library(e, f"--gate {gate_dir!r}: ") from None
    return RetrievalSkip(confidence=confidence, gate=gate,
                         gate_threshold=0.5 if threshold is None else threshold)


def _robust(directory, datastore, exact):
    from ...methods.robust import RobustKNNDecoder
    return RobustKNNDecoder.load(directory, datastore, exact=exact)
