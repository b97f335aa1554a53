"""Tiny models and corpora shared by the CLI tests (tests/test_cli*.py), and helpers that
run the ``knnfast`` entry point in-process.

A WordLevel tokenizer is trained on a few dozen English/German sentences written here and
saved, as a transformers tokenizer, next to a tiny random MarianMTModel (seq2seq path) and
a tiny random GPT2LMHeadModel (causal path)."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel,
                          PreTrainedTokenizerFast)

from knnfast.app.cli import main

# Lower case, no punctuation: a WordLevel tokenizer with a whitespace pre-tokenizer then
# decodes every sentence back to itself. Sources are all different.
PAIRS = [
    ("the cat sits on the mat", "die katze sitzt auf der matte"),
    ("the dog runs in the park", "der hund rennt im park"),
    ("i like green tea", "ich mag gruenen tee"),
    ("we read a good book", "wir lesen ein gutes buch"),
    ("the house is very big", "das haus ist sehr gross"),
    ("my brother plays football", "mein bruder spielt fussball"),
    ("she drinks cold water", "sie trinkt kaltes wasser"),
    ("the sun is shining today", "die sonne scheint heute"),
    ("he opens the door", "er oeffnet die tuer"),
    ("the file could not be opened", "die datei konnte nicht geoeffnet werden"),
    ("the car is red", "das auto ist rot"),
    ("we eat bread and cheese", "wir essen brot und kaese"),
    ("the child sleeps", "das kind schlaeft"),
    ("open the window please", "oeffne bitte das fenster"),
    ("the train is late", "der zug ist spaet"),
    ("i write a letter", "ich schreibe einen brief"),
    ("the bird sings in the tree", "der vogel singt im baum"),
    ("they live in a small town", "sie wohnen in einer kleinen stadt"),
    ("the teacher explains the lesson", "der lehrer erklaert die lektion"),
    ("save the file", "speichere die datei"),
    ("the night is dark", "die nacht ist dunkel"),
    ("my sister reads the newspaper", "meine schwester liest die zeitung"),
    ("the coffee is hot", "der kaffee ist heiss"),
    ("we go home now", "wir gehen jetzt nach hause"),
    ("the garden is green", "der garten ist gruen"),
    ("close the program", "schliesse das programm"),
    ("the flowers are beautiful", "die blumen sind schoen"),
    ("he buys a new phone", "er kauft ein neues telefon"),
    ("the street is empty", "die strasse ist leer"),
    ("you speak very fast", "du sprichst sehr schnell"),
]
SPECIALS = ["<pad>", "</s>", "<unk>"]   # ids 0, 1, 2



def _tokenizer():
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([s for pair in PAIRS for s in pair],
                            trainers.WordLevelTrainer(special_tokens=SPECIALS))
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Model dirs (Marian, GPT-2, same tokenizer), a TSV and a text corpus."""
    root = tmp_path_factory.mktemp("cli")
    tok = _tokenizer()
    V = len(tok)
    torch.manual_seed(0)
    mcfg = MarianConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0, max_position_embeddings=64, init_std=0.3)
    marian_dir = root / "marian"
    MarianMTModel(mcfg).eval().save_pretrained(marian_dir)
    tok.save_pretrained(marian_dir)
    torch.manual_seed(0)
    gcfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1, initializer_range=0.2)
    gpt2_dir = root / "gpt2"
    GPT2LMHeadModel(gcfg).eval().save_pretrained(gpt2_dir)
    tok.save_pretrained(gpt2_dir)

    tsv = root / "train.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS), encoding="utf-8")
    txt = root / "train.txt"
    txt.write_text("".join(f"{s}\n{t}\n" for s, t in PAIRS), encoding="utf-8")
    src = root / "src.txt"
    src.write_text("".join(f"{s}\n" for s, _ in PAIRS), encoding="utf-8")
    return {"root": root, "tok": tok, "marian": str(marian_dir), "gpt2": str(gpt2_dir),
            "tsv": str(tsv), "txt": str(txt), "src": str(src)}


def run_json(capsys, *argv, stream="out"):
    """Run ``knnfast argv...`` in-process, return the JSON it printed."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    cap = capsys.readouterr()
    text = cap.out if stream == "out" else cap.err.strip().splitlines()[-1]
    return json.loads(text)


def run_fail(capsys, *argv):
    """Run a command that must fail: (exit code, its stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    assert code != 0
    return code, capsys.readouterr().err


def fail(capsys, *argv):
    """Run a command that must fail; its one error line (the last line of stderr, which
    may hold warnings before it), checked for the ``knnfast: <what> (<fix>)`` form."""
    _, err = run_fail(capsys, *argv)
    line = err.strip().splitlines()[-1]
    assert line.startswith("knnfast: ") and line.endswith(")"), err
    assert "Traceback" not in err, err
    return line


@pytest.fixture(scope="module")
def marian_ds(env):
    """Datastore of the Marian model over the TSV corpus (built through the CLI)."""
    out = str(env["root"] / "ds_marian")
    assert main(["build-datastore", "--model", env["marian"], "--corpus", env["tsv"],
                 "--out", out, "--batch-size", "8"]) == 0
    return out


@pytest.fixture(scope="module")
def gpt2_ds(env):
    out = str(env["root"] / "ds_gpt2")
    assert main(["build-datastore", "--model", env["gpt2"], "--corpus", env["txt"],
                 "--out", out, "--batch-size", "16"]) == 0
    return out


