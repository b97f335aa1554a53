"""English→German parallel corpus from the gettext catalogs installed on a Debian/Ubuntu box.

Every translated program ships ``/usr/share/locale/de/LC_MESSAGES/<name>.mo``: a list of
(English msgid, German msgstr) pairs. The kNN-MT demo uses the PostgreSQL catalogs as the
"in-domain" corpus (datastore + test set) and everything else (git, coreutils, gnupg, ...)
as the "general" corpus the base model is trained on.

    catalogs = load_catalogs()                 # {"git": [(en, de), ...], "psql-15": ...}
    split = split_domains(catalogs)            # DemoSplit: general_train, ..., in_test
    codec = TextCodec(train_tokenizer(...))    # shared byte-level BPE, </s> appended

This module needs only ``tokenizers`` at import time; ``TextCodec.encode_batch`` imports torch.
"""
from __future__ import annotations

import codecs
import random
import re
import struct
import unicodedata
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

Pair = tuple[str, str]

DEFAULT_LOCALE_DIR = "/usr/share/locale/de/LC_MESSAGES"
MAX_CHARS = 200
INSTALL_HINT = (
    "The kNN-MT demo builds its English->German corpus from the German gettext catalogs "
    "(*.mo) of installed programs. On Debian/Ubuntu install some programs that ship them, "
    "e.g.: apt-get install postgresql-15 postgresql-client-15 git coreutils tar wget "
    "gnupg-l10n libc-l10n iso-codes  (the PostgreSQL ones are the in-domain corpus; use the "
    "version your release has, e.g. postgresql-16 on Ubuntu 24.04). Make sure "
    "/etc/dpkg/dpkg.cfg.d/ does not exclude /usr/share/locale (slim Docker images do: "
    "remove the 'path-exclude /usr/share/locale/*' line and reinstall)."
)

# --------------------------------------------------------------------------------------------
# .mo reader
# --------------------------------------------------------------------------------------------

_MO_MAGIC = 0x950412DE
_CHARSET_RE = re.compile(rb"charset=\s*([-\w.:]+)", re.IGNORECASE)


def _mo_charset(header: bytes) -> str:
    """The codec named in a catalog header (``Content-Type: ...; charset=X``), UTF-8 if absent
    or unknown (``charset=CHARSET`` templates)."""
    match = _CHARSET_RE.search(header)
    if match:
        try:
            return codecs.lookup(match.group(1).decode("ascii")).name
        except LookupError:
            pass
    return "utf-8"


def _mo_entries(data: bytes) -> list[tuple[bytes, bytes]]:
    """The raw (msgid, msgstr) byte strings of a .mo file, in file order."""
    if len(data) < 20:
        raise ValueError("not a .mo file: too short")
    for order in "<>":
        if struct.unpack(order + "I", data[:4])[0] == _MO_MAGIC:
            break
    else:
        raise ValueError(f"not a .mo file: bad magic {data[:4].hex()}")
    count, orig_table, trans_table = struct.unpack(order + "3I", data[8:20])
    entries = []
    for i in range(count):
        olen, ooff = struct.unpack_from(order + "2I", data, orig_table + 8 * i)
        tlen, toff = struct.unpack_from(order + "2I", data, trans_table + 8 * i)
        if ooff + olen > len(data) or toff + tlen > len(data):
            raise ValueError(f"not a .mo file: entry {i} points past the end")
        entries.append((data[ooff:ooff + olen], data[toff:toff + tlen]))
    return entries


def read_mo(path: str | Path) -> list[Pair]:
    """(msgid, msgstr) pairs of a GNU gettext .mo file, decoded with the catalog's charset.

    Either byte order is accepted. The msgctxt (``ctx\\x04msgid``) is stripped; a plural
    entry gives two pairs, (msgid, msgstr[0]) and (msgid_plural, msgstr[1]). The header,
    empty translations and entries that do not decode are skipped. Text is returned as stored
    (no whitespace clean-up: see :func:`clean_pairs`).
    """
    entries = _mo_entries(Path(path).read_bytes())
    header = next((msgstr for msgid, msgstr in entries if msgid == b""), b"")
    charset = _mo_charset(header)
    pairs: list[Pair] = []
    for msgid, msgstr in entries:
        msgid = msgid.rpartition(b"\x04")[2]
        if not msgid:
            continue
        try:
            sources = msgid.decode(charset).split("\x00")
            targets = msgstr.decode(charset).split("\x00")
        except UnicodeDecodeError:
            continue
        pairs.extend((src, tgt) for src, tgt in zip(sources, targets) if src and tgt)
    return pairs


# --------------------------------------------------------------------------------------------
# cleaning and catalog loading
# --------------------------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    """NFC, whitespace runs (incl. newlines and tabs) collapsed to one space, stripped.
    Placeholders (``%s``, ``%1$d``, ``{name}``) and quotes (»«, „“) are left as they are."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def clean_pairs(pairs: Iterable[Pair], max_chars: int = MAX_CHARS) -> list[Pair]:
    """Normalised pairs without empty, over-long (> ``max_chars`` on either side),
    untranslated (source == target) and repeated pairs; first-seen order is kept."""
    seen: set[Pair] = set()
    out: list[Pair] = []
    for src, tgt in pairs:
        pair = (normalize_text(src), normalize_text(tgt))
        src, tgt = pair
        if not src or not tgt or len(src) > max_chars or len(tgt) > max_chars:
            continue
        if src == tgt or pair in seen:
            continue
        seen.add(pair)
        out.append(pair)
    return out


def load_catalogs(locale_dir: str | Path = DEFAULT_LOCALE_DIR,
                  max_chars: int = MAX_CHARS) -> dict[str, list[Pair]]:
    """Cleaned pairs of every ``*.mo`` in ``locale_dir``, keyed by catalog name (file stem).

    Catalogs whose cleaned pair set equals an earlier one's are dropped (``iso_639_3`` is a
    symlink to, or a copy of, ``iso_639-3``): real files are kept over symlinks, then the
    first name in sorted order. Unreadable files and catalogs left empty are skipped.
    Raises FileNotFoundError with an install hint when there is no catalog at all.
    """
    directory = Path(locale_dir)
    files = sorted(directory.glob("*.mo"), key=lambda p: (p.is_symlink(), p.name))
    catalogs: dict[str, list[Pair]] = {}
    seen: set[frozenset[Pair]] = set()
    for path in files:
        try:
            pairs = clean_pairs(read_mo(path), max_chars)
        except (OSError, ValueError, struct.error):
            continue
        key = frozenset(pairs)
        if pairs and key not in seen:
            seen.add(key)
            catalogs[path.stem] = pairs
    if not catalogs:
        what = "no readable .mo catalogs in" if directory.is_dir() else "no such directory:"
        raise FileNotFoundError(f"{what} {directory}. {INSTALL_HINT}")
    return dict(sorted(catalogs.items()))


# --------------------------------------------------------------------------------------------
# domain split
# --------------------------------------------------------------------------------------------

_POSTGRES_RE = re.compile(
    r"(postgres(ql)?|psql|initdb|plpgsql|pl(perl|python\d*|tcl)|pgscripts|pgtypeslib\d*"
    r"|ecpg(lib)?\d*|libpq\d*|pg_\w+)")
_VERSION_SUFFIX_RE = re.compile(r"-\d+(\.\d+)*$")


def is_postgres(name: str) -> bool:
    """True for a PostgreSQL catalog name, with or without its major-version suffix:
    ``postgres-15``, ``psql-16``, ``pg_dump``, ``libpq5-15``, ``ecpglib6-17``, ``plpgsql``."""
    return _POSTGRES_RE.fullmatch(_VERSION_SUFFIX_RE.sub("", name.lower())) is not None


@dataclass
class DemoSplit:
    """The demo's data. Each source string belongs to exactly one split.

    general_train / general_dev: non-PostgreSQL catalogs (base model training / its dev set).
    in_train: PostgreSQL pairs for the kNN datastore; in_dev: tuning λ, τ, k and the adaptive
    network; in_test: the held-out PostgreSQL test set.
    """
    general_train: list[Pair]
    general_dev: list[Pair]
    in_train: list[Pair]
    in_dev: list[Pair]
    in_test: list[Pair]

    def sizes(self) -> dict[str, int]:
        """Number of pairs per split."""
        return {f.name: len(getattr(self, f.name)) for f in fields(self)}


def _group_by_source(pairs: Iterable[Pair]) -> dict[str, list[str]]:
    """Distinct targets per source, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for src, tgt in pairs:
        targets = groups.setdefault(src, [])
        if tgt not in targets:
            targets.append(tgt)
    return groups


def _one_reference(groups: dict[str, list[str]], sources: list[str],
                   counts: Counter[Pair]) -> list[Pair]:
    """One pair per source for an evaluation split: its most frequent target (ties: first)."""
    return [(s, max(groups[s], key=lambda t: counts[(s, t)])) for s in sources]


def _all_targets(groups: dict[str, list[str]], sources: list[str]) -> list[Pair]:
    """Every distinct pair of the given sources, for a training split."""
    return [(s, t) for s in sources for t in groups[s]]


def _shuffled_sources(groups: dict[str, list[str]], seed: int) -> list[str]:
    sources = sorted(groups)
    random.Random(seed).shuffle(sources)
    return sources


def split_domains(catalogs: dict[str, list[Pair]],
                  in_domain: Callable[[str], bool] = is_postgres, seed: int = 0,
                  n_dev: int = 300, n_test: int = 500, n_general_dev: int = 500) -> DemoSplit:
    """Split catalogs into a :class:`DemoSplit`, deterministically for a given ``seed``.

    Splitting is by source string: all pairs with the same English source land in one split,
    so no test or dev source is seen in training or in the datastore. A source that occurs in
    an in-domain catalog is in-domain (its pairs from general catalogs are dropped).
    Evaluation splits keep one reference per source (the most frequent translation); training
    splits keep every distinct translation.
    """
    in_pairs = [p for name, ps in catalogs.items() if in_domain(name) for p in ps]
    in_counts = Counter(in_pairs)
    in_groups = _group_by_source(in_pairs)
    general_pairs = [p for name, ps in catalogs.items() if not in_domain(name)
                     for p in ps if p[0] not in in_groups]
    general_counts = Counter(general_pairs)
    general_groups = _group_by_source(general_pairs)

    in_sources = _shuffled_sources(in_groups, seed)
    if len(in_sources) <= n_dev + n_test:
        raise ValueError(f"only {len(in_sources)} in-domain sources, need > {n_dev + n_test}")
    general_sources = _shuffled_sources(general_groups, seed + 1)
    if len(general_sources) <= n_general_dev:
        raise ValueError(f"only {len(general_sources)} general sources, "
                         f"need > {n_general_dev}")
    return DemoSplit(
        general_train=_all_targets(general_groups, general_sources[n_general_dev:]),
        general_dev=_one_reference(general_groups, general_sources[:n_general_dev],
                                   general_counts),
        in_train=_all_targets(in_groups, in_sources[n_dev + n_test:]),
        in_dev=_one_reference(in_groups, in_sources[n_test:n_test + n_dev], in_counts),
        in_test=_one_reference(in_groups, in_sources[:n_test], in_counts),
    )


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000,
                    min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE shared by source and target: lossless for any text (umlauts, »«,
    emoji), ``<pad>``=0, ``</s>``=1, ``<unk>``=2, and ``encode`` appends ``</s>``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    return tokenizer


class TextCodec:
    """Text ⇄ padded id tensors with a shared tokenizer (see :func:`train_tokenizer`)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id("<pad>")
        self.eos_id = tokenizer.token_to_id("</s>")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, ending with ``</s>``."""
        return self.tokenizer.encode(text).ids

    def encode_rows(self, texts: list[str], max_len: int) -> list[list[int]]:
        """Token ids of each text, ending with ``</s>``; rows longer than ``max_len`` are cut
        and still end with ``</s>``."""
        rows = [e.ids for e in self.tokenizer.encode_batch(texts)]
        return [r if len(r) <= max_len else r[:max_len - 1] + [self.eos_id] for r in rows]

    def encode_batch(self, texts: list[str], max_len: int):
        """``(ids, mask)``: LongTensors [B, T], padded with ``pad_id``, T = the longest row
        (at most ``max_len``, see :meth:`encode_rows`)."""
        import torch

        rows = self.encode_rows(texts, max_len)
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        return ids, mask

    def decode(self, ids) -> str:
        """Text of a sequence of ids (list or 1-D tensor), cut at the first ``</s>``, special
        tokens (pad, the decoder start) removed."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "TextCodec":
        return cls(Tokenizer.from_file(str(path)))

    def to_json(self) -> str:
        """The tokenizer as a JSON string (what :meth:`save` writes)."""
        return self.tokenizer.to_str()


def round_trip_fraction(codec: TextCodec, texts: Iterable[str]) -> float:
    """Fraction of ``texts`` with ``decode(encode(x)) == x``."""
    texts = list(texts)
    ok = sum(codec.decode(codec.encode(t)) == t for t in texts)
    return ok / max(len(texts), 1)
