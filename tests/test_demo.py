"""The demo's kNN-MT pipeline end to end on a tiny split and a tiny random Marian (the real
run is `make demo`); the fallback corpus split; the report renderer."""
import json

import pytest
import torch

from knnfast.app import demo
from knnfast.app.corpus import DemoSplit, TextCodec, train_tokenizer

WORDS_EN = "could not open read write file table index role schema server".split()
WORDS_DE = "konnte nicht öffnen lesen schreiben Datei Tabelle Index Rolle Schema Server".split()



pytestmark = pytest.mark.usefixtures("single_threaded")


def _pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS_EN), (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        out.append((" ".join(WORDS_EN[i] for i in idx), " ".join(WORDS_DE[i] for i in idx)))
    return out


def test_run_knn_mt_tiny(tmp_path):
    split = DemoSplit(general_train=_pairs(20, 0), general_dev=_pairs(4, 1), in_train=_pairs(60, 2),
                      in_dev=_pairs(12, 3), in_test=_pairs(10, 4))
    codec = TextCodec(train_tokenizer([t for p in split.in_train + split.general_train for t in p],
                                      vocab_size=120))
    torch.manual_seed(0)
    model = demo.build_marian(codec.vocab_size, d_model=32, layers=1, heads=2, ffn_dim=64,
                              dropout=0.0, max_positions=64).eval()
    logs = []
    out = demo.run_knn_mt(model, codec, split, tmp_path / "cache", tmp_path, logs.append)
    n_tokens = sum(len(codec.encode(t)) for _, t in split.in_train)
    assert out["datastore"]["entries"] == n_tokens
    assert out["datastore"]["index"] == demo.ivf_factory(n_tokens)
    assert set(out["systems"]) == {"base", "kNN-MT", "adaptive kNN-MT", "robust kNN-MT",
                                   "kNN-MT (reference path)"}
    # the fused and the reference path decode the same sentences
    fused, ref = out["systems"]["kNN-MT"], out["systems"]["kNN-MT (reference path)"]
    assert fused["bleu"] == pytest.approx(ref["bleu"]) and fused["chrf"] == pytest.approx(ref["chrf"])
    assert [p[0] for p in out["bleu_vs_lambda"]] == list(demo.LAMBDA_GRID)
    assert (tmp_path / "bleu_vs_lambda.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cache" / "adaptive" / "meta_k.pt").exists()
    assert (tmp_path / "cache" / "robust" / "robust.pt").exists()
    assert out["robust"]["updates"] > 0
    report = {"date": "d", "machine": "m", "split": split.sizes(), "model": "tiny", "knn": out}
    md = demo.render_report(json.loads(json.dumps(report)))
    assert "| kNN-MT |" in md and "bleu_vs_lambda.png" in md
    # a second run reuses the cached datastore
    demo.run_knn_mt(model, codec, split, tmp_path / "cache", tmp_path, logs.append)
    assert any("loaded from cache" in line for line in logs)


def test_python_doc_fallback_split_holds_out_unseen_paragraphs():
    train, dev, test = demo.python_doc_chunks()
    assert train and dev and test
    seen = set(train)
    assert not seen & set(dev) and not seen & set(test) and not set(dev) & set(test)
