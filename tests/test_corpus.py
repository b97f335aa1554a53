"""knnfast.app.corpus: .mo reader, cleaning, catalog loading, domain split, tokenizer."""
import struct

import pytest

from knnfast.app.corpus import (INSTALL_HINT, TextCodec, clean_pairs, is_postgres, load_catalogs,
                            read_mo, round_trip_fraction, split_domains, train_tokenizer)


def write_mo(path, entries, charset="UTF-8", byteorder="<"):
    """A GNU .mo file with a header entry for ``charset`` plus ``entries`` (msgid, msgstr
    as bytes, already encoded; msgctxt as b"ctx\\x04id", plurals joined by b"\\x00")."""
    header = (b"Project-Id-Version: test\nMIME-Version: 1.0\n"
              b"Content-Type: text/plain; charset=" + charset.encode() + b"\n")
    entries = sorted([(b"", header), *entries])
    n = len(entries)
    orig_table, trans_table = 28, 28 + 8 * n
    offset = 28 + 16 * n
    blob, orig, trans = b"", [], []
    for table, index in ((orig, 0), (trans, 1)):
        for entry in entries:
            data = entry[index]
            table.append((len(data), offset + len(blob)))
            blob += data + b"\x00"
    fmt = byteorder + "I"
    out = struct.pack(byteorder + "7I", 0x950412DE, 0, n, orig_table, trans_table, 0, offset)
    for length, off in orig + trans:
        out += struct.pack(fmt, length) + struct.pack(fmt, off)
    path.write_bytes(out + blob)
    return path


UTF8_ENTRIES = [
    (b"File", "Datei".encode()),
    (b"menu\x04Open", "Öffnen".encode()),
    (b"%d file\x00%d files", "%d Datei\x00%d Dateien".encode()),
    (b"Not translated", b""),
    (b"Broken", b"\xff\xfe kaputt"),  # not UTF-8: skipped
]


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_read_mo_utf8_context_plural(tmp_path, byteorder):
    pairs = read_mo(write_mo(tmp_path / "a.mo", UTF8_ENTRIES, byteorder=byteorder))
    assert sorted(pairs) == sorted([
        ("File", "Datei"), ("Open", "Öffnen"),
        ("%d file", "%d Datei"), ("%d files", "%d Dateien")])


def test_read_mo_latin1(tmp_path):
    entries = [(b"Size", "Größe »%s«".encode("latin-1")),
               (b"Key", "Schlüssel".encode("latin-1"))]
    pairs = read_mo(write_mo(tmp_path / "l.mo", entries, charset="ISO-8859-1", byteorder=">"))
    assert sorted(pairs) == [("Key", "Schlüssel"), ("Size", "Größe »%s«")]


def test_read_mo_rejects_other_files(tmp_path):
    path = tmp_path / "x.mo"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="magic"):
        read_mo(path)


def test_clean_pairs():
    pairs = [("  could not\n open  %s\t", "konnte »%s«\n nicht öffnen "),
             ("could not open %s", "konnte »%s« nicht öffnen"),  # duplicate after cleaning
             ("OK", "OK"),                                       # untranslated
             ("", "leer"), ("x" * 201, "y"), ("a", " ")]
    assert clean_pairs(pairs) == [("could not open %s", "konnte »%s« nicht öffnen")]


def test_load_catalogs_dedupes_catalogs(tmp_path):
    write_mo(tmp_path / "iso_639-3.mo", [(b"German", "Deutsch".encode())])
    write_mo(tmp_path / "iso_639_3.mo", [(b"German", "Deutsch".encode())])
    write_mo(tmp_path / "psql-15.mo", [(b"table", "Tabelle".encode())])
    (tmp_path / "broken.mo").write_bytes(b"not a catalog at all")
    assert load_catalogs(tmp_path) == {"iso_639-3": [("German", "Deutsch")],
                                       "psql-15": [("table", "Tabelle")]}


@pytest.mark.parametrize("make_dir", [False, True])
def test_load_catalogs_missing_raises_with_install_hint(tmp_path, make_dir):
    locale_dir = tmp_path / "de" / "LC_MESSAGES"
    if make_dir:
        locale_dir.mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        load_catalogs(locale_dir)
    message = str(info.value)
    assert str(locale_dir) in message and INSTALL_HINT in message
    assert "apt-get install postgresql-15" in message


@pytest.mark.parametrize("name, expected", [
    ("postgres-15", True), ("postgres-17", True), ("psql-16", True), ("pg_dump-15", True),
    ("pg_dump", True), ("libpq5-15", True), ("plpgsql-15", True), ("initdb-15", True),
    ("ecpglib6-15", True), ("pgscripts-15", True), ("git", False), ("iso_15924", False),
    ("gstreamer-1.0", False), ("libc", False), ("gnupg2", False), ("shadow", False)])
def test_is_postgres(name, expected):
    assert is_postgres(name) is expected


def synthetic_catalogs():
    postgres = [(f"could not open relation {i}", f"konnte Relation {i} nicht öffnen")
                for i in range(1500)]
    pg_dump = [(f"could not open relation {i}", f"Relation {i} nicht geöffnet")
               for i in range(0, 1500, 7)] + [(f"dump table {i}", f"Tabelle {i} sichern")
                                              for i in range(200)]
    git = [(f"could not open relation {i}", f"Relation {i} ungeöffnet")
           for i in range(0, 1500, 11)] + [(f"commit {i} failed", f"Commit {i} fehlgeschlagen")
                                           for i in range(1200)]
    return {"git": git, "pg_dump-16": pg_dump, "postgres-16": postgres}


def test_split_is_deterministic_and_disjoint_by_source():
    catalogs = synthetic_catalogs()
    split = split_domains(catalogs, seed=3, n_dev=100, n_test=200, n_general_dev=150)
    assert split == split_domains(catalogs, seed=3, n_dev=100, n_test=200, n_general_dev=150)
    assert split != split_domains(catalogs, seed=4, n_dev=100, n_test=200, n_general_dev=150)
    sizes = split.sizes()
    assert (sizes["in_dev"], sizes["in_test"], sizes["general_dev"]) == (100, 200, 150)
    assert sizes["general_train"] == 1200 - 150

    sources = {name: {s for s, _ in getattr(split, name)} for name in sizes}
    names = list(sources)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sources[a] & sources[b], (a, b)
    # sources shared with git are in-domain; eval splits have one reference per source
    assert all(s.startswith("commit") for s in sources["general_train"])
    assert len(split.in_test) == len(sources["in_test"])
    assert dict(split.in_test)[split.in_test[0][0]].startswith("konnte")


def test_tokenizer_round_trip_and_codec(tmp_path):
    texts = ["Größe der Datei »%s« überschreitet das Maß", "konnte Schlüssel nicht öffnen",
             "„Zitat“ – äöü ÄÖÜ ß", "could not open file \"%s\": %m"] * 20
    codec = TextCodec(train_tokenizer(texts, vocab_size=400))
    assert (codec.pad_id, codec.eos_id, codec.tokenizer.token_to_id("<unk>")) == (0, 1, 2)
    unseen = ["Überprüfung fehlgeschlagen: ÿ €  😀", "Öl"]
    assert round_trip_fraction(codec, texts + unseen) == 1.0
    assert codec.encode("Maß")[-1] == codec.eos_id

    ids, mask = codec.encode_batch(["Größe", texts[0]], max_len=6)
    assert ids.shape == mask.shape == (2, 6)
    assert ids[:, -1].tolist() == [codec.pad_id, codec.eos_id]  # cut rows end with </s>
    n = len(codec.encode("Größe"))
    assert mask[0].tolist() == [1] * n + [0] * (6 - n)
    assert codec.decode([0, *ids[0].tolist()]) == "Größe"  # decoder start and pad stripped

    codec.save(tmp_path / "tok.json")
    loaded = TextCodec.load(tmp_path / "tok.json")
    assert loaded.vocab_size == codec.vocab_size
    assert loaded.encode(texts[0]) == codec.encode(texts[0])
