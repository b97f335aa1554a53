"""The examples at the end of each command's --help. They run as written after `make demo`
(which trains .cache/demo/base_model and exports its corpora to .cache/demo/corpus/), in
this order; tests/test_cli_examples.py runs every line on tiny stand-ins."""

DEMO_MODEL = ".cache/demo/base_model"
CORPUS = ".cache/demo/corpus"
_M = f"--model {DEMO_MODEL}"
_MD = f"{_M} --datastore ds/postgres"

EXAMPLES = {
    "build-datastore": f"""examples:
  knnfast build-datastore {_M} --corpus {CORPUS}/in_train.tsv --out ds/postgres
  knnfast build-datastore {_M} --corpus {CORPUS}/in_train.tsv --out ds/postgres-att --hidden att --limit 2000
  torchrun --nproc-per-node 2 -m knnfast build-datastore {_M} --corpus {CORPUS}/in_train.tsv --out ds/postgres-sharded   # a shard per rank
A causal LM works the same way, with one text per corpus line.""",
    "build-index": """examples:
  knnfast build-index ds/postgres                      # Flat below 1M entries, IVF4096,PQ64 above
  knnfast build-index ds/postgres --factory IVF64,Flat --train-size 20000 --nprobe 8""",
    "verify": """examples:
  knnfast verify ds/postgres          # exit 0: intact; 3: names every bad file and block""",
    "eval-ppl": f"""examples:
  knnfast eval-ppl {_MD} --corpus {CORPUS}/in_test.tsv --k 16 --temperature 10 --lam 0.5
  knnfast eval-ppl {_MD} --corpus {CORPUS}/in_test.tsv --k 16 --index   # after build-index""",
    "tune": f"""examples:
  knnfast tune {_MD} --corpus {CORPUS}/in_dev.tsv --save tuned.json
  knnfast tune {_MD} --corpus {CORPUS}/in_dev.tsv --ks 4,8,16 --temperatures 1,10,100 --grid-out grid.json""",
    "translate": f"""examples:
  echo "could not open file" | knnfast translate {_MD}
  knnfast translate {_MD} --settings tuned.json --input {CORPUS}/in_test.src --output hyp.txt
  knnfast translate {_M} --input {CORPUS}/in_test.src --output base.txt --beams 1   # bare model""",
    "bench": """examples:
  knnfast bench                      # fused vs pure-PyTorch reference, decoding-step shapes
  knnfast bench --rows 640 --vocab 42024 --k 8""",
    "analyze": f"""examples:
  knnfast analyze frequency {_MD} --corpus {CORPUS}/in_test.tsv --plot freq.png
  knnfast analyze mask-score {_MD} --corpus {CORPUS}/in_test.tsv --k 16 --limit 200
  knnfast analyze size {_MD} --corpus {CORPUS}/in_test.tsv --fractions 0.05,0.25,1 --plot size.png
  knnfast analyze lambda {_MD} --corpus {CORPUS}/in_dev.tsv --plot lam.png""",
    "demo": """examples:
  knnfast demo                       # the English->German kNN-MT demo (same as `make demo`)
  knnfast demo --cache .cache/demo --updates 3000 --retrain
  knnfast demo --export corpora      # only the corpora as TSV files""",
    "reproduce": """examples:
  knnfast reproduce meta-optimizer          # full run (<= 30 min on 2 cores), report in reproduce-results/
  knnfast reproduce all --quick             # every study at the tiny test scale (seconds each)
  knnfast reproduce knnlm-why --out docs/reproduce --cache .cache/reproduce""",
}
