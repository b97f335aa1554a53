"""What the commands read and write: models, corpora, datastores, settings files and JSON,
each with its mistakes turned into one-line errors before any work starts; and the checks
that a model and a datastore belong together."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from typing import List, Optional

from .errors import DataError, UsageError, from_library, warn


# --------------------------------------------------------------------------- output

def strict(obj):
    """``obj`` with every non-finite float as None: the JSON we write is strict (no
    Infinity/NaN, which other parsers reject); null means infinite or undefined."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj, indent: Optional[int] = 1) -> str:
    return json.dumps(strict(obj), indent=indent, sort_keys=True, allow_nan=False)


def print_json(obj) -> None:
    print(dumps(obj))


def check_writable(option: str, path: Optional[str]) -> None:
    """Refuse an output path whose directory does not exist, before any work."""
    if not path or path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DataError(f"{option} {path!r}: directory {parent!r} does not exist",
                        f"create it first: mkdir -p {parent}")


def write_json(option: str, path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(obj) + "\n")


# --------------------------------------------------------------------------- inputs

def check_readable(option: str, path: str, what: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{option} {path!r} does not exist", f"give {what}")
    if os.path.isdir(path):
        raise DataError(f"{option} {path!r} is a directory", f"give {what}")


def read_lines(option: str, path: str, what: str) -> List[str]:
    """The lines of a UTF-8 file ('-': stdin), line ends removed."""
    if path == "-":
        return [line.rstrip("\r\n") for line in sys.stdin]
    check_readable(option, path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise DataError(f"{option} {path!r} is not UTF-8 text (byte {e.start})",
                        "convert it, e.g. iconv -t UTF-8") from None


def load_model(path: str):
    """A local HF model directory -> (model in eval mode, tokenizer)."""
    fix = "pass a directory written by save_pretrained (config.json, weights, tokenizer files)"
    if not os.path.isdir(path):
        raise DataError(f"--model {path!r} is not a directory", fix)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise DataError(f"--model {path!r} has no config.json", fix)
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoTokenizer)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the commands draw their own progress, not per-file bars
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = cls.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise from_library(e, f"--model {path!r}: ") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"--model {path!r}: no usable tokenizer ({str(e).splitlines()[0]})",
                        "save it next to the model: tokenizer.save_pretrained(DIR)") from None
    return model, tokenizer


def read_corpus(path: str, model, tokenizer, limit: Optional[int] = None, option: str = "--corpus"):
    """Token-id examples from a text file (causal) or TSV (encoder-decoder)."""
    seq2seq = model.config.is_encoder_decoder
    form = "'source<TAB>target' lines" if seq2seq else "one text per line"
    lines = read_lines(option, path, f"a UTF-8 corpus file of {form}")
    numbered = [(no, line) for no, line in enumerate(lines, 1) if line.strip()][:limit]
    if not numbered:
        raise DataError(f"{option} {path!r} has no non-blank lines", f"give a corpus of {form}")
    texts = [line for _, line in numbered]
    if not seq2seq:
        ids = [x for x in tokenizer(texts)["input_ids"] if len(x) >= 2]
        if not ids:
            raise DataError(f"{option} {path!r}: no line has two or more tokens",
                            "a causal LM needs at least one next-token target per line")
        return ids
    bad = [no for no, line in numbered if "\t" not in line]
    if bad:
        raise DataError(f"{path}:{bad[0]}: encoder-decoder corpora need 'source<TAB>target' "
                        f"lines", f"{len(bad)} line(s) have no TAB; fix or remove them")
    src, tgt = zip(*(line.split("\t", 1) for line in texts))
    return list(zip(tokenizer(list(src))["input_ids"],
                    tokenizer(text_target=list(tgt))["input_ids"]))


def open_datastore(path: str, option: str = "--datastore"):
    from ...storage import Datastore, DatastoreError
    if not os.path.isdir(path):
        raise DataError(f"{option} {path!r}: cannot open datastore: not a directory",
                        "build one with `knnfast build-datastore`")
    try:
        return Datastore.open(path)
    except (DatastoreError, OSError) as e:
        raise from_library(e, f"cannot open datastore: ") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id): the same ids mean the same tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def read_settings(path: str) -> dict:
    """k / temperature / λ from a `knnfast tune --save` file."""
    check_readable("--settings", path, "a file written by `knnfast tune --save FILE`")
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except ValueError as e:
        raise DataError(f"--settings {path!r} is not valid JSON ({e})",
                        "write it with `knnfast tune --save FILE`") from None
    if not isinstance(settings, dict) or not {"k", "temperature", "lam"} <= set(settings):
        raise DataError(f"--settings {path!r} lacks k, temperature or lam",
                        "write it with `knnfast tune --save FILE`")
    return settings


def resolve_knn(args, preset) -> None:
    """Fill args.k / temperature / lam: the command line, else --settings, else ``preset``;
    args.settings_from says where they came from."""
    given = read_settings(args.settings) if getattr(args, "settings", None) else {}
    for name in ("k", "temperature", "lam"):
        if getattr(args, name) is None:
            setattr(args, name, given.get(name, getattr(preset, name)))
    if given and not (1 <= int(args.k) and 0 <= float(args.lam) <= 1 and args.temperature > 0):
        raise UsageError(f"--settings {args.settings!r} holds k={args.k}, temperature="
                         f"{args.temperature}, lam={args.lam}",
                         "k >= 1, temperature > 0, 0 <= lam <= 1")
