"""The commands that run whole programs: ``bench``, ``demo`` and ``reproduce``."""
from __future__ import annotations

import os

from .errors import DataError
from .loading import print_json


def cmd_bench(args) -> None:
    import torch
    from torch.utils import benchmark
    from ... import ops, reference
    torch.manual_seed(0)
    B, V, k = args.rows, args.vocab, args.k
    logits = torch.randn(B, V)
    tokens = torch.randint(0, V, (B, k))
    scores = -torch.rand(B, k) * 100
    keys = torch.randn(args.keys, args.dim).half()
    queries = torch.randn(B, args.dim)
    cases = {
        "knn_interpolate": (lambda: ops.knn_interpolate(logits, tokens, scores=scores, temperature=10.0, lam=0.5),
                            lambda: reference.knn_interpolate(logits, tokens, scores=scores, temperature=10.0, lam=0.5)),
        "knn_search": (lambda: ops.knn_search(queries, keys, min(k, args.keys)),
                       lambda: reference.knn_search(queries, keys, min(k, args.keys))),
    }
    rows = {}
    for name, (fused, ref) in cases.items():
        tf = benchmark.Timer("f()", globals={"f": fused}).blocked_autorange(min_run_time=args.seconds).median
        tr = benchmark.Timer("f()", globals={"f": ref}).blocked_autorange(min_run_time=args.seconds).median
        rows[name] = {"fused_ms": round(tf * 1e3, 3), "reference_ms": round(tr * 1e3, 3),
                      "speedup": round(tr / tf, 2)}
    print_json({"shape": {"rows": B, "vocab": V, "k": k, "keys": args.keys, "dim": args.dim,
                          "threads": torch.get_num_threads()}, "results": rows})


def cmd_demo(args) -> None:
    from .. import demo
    if args.export:
        try:
            files = demo.export_corpora(args.export, locale_dir=args.locale_dir)
        except FileNotFoundError as e:
            raise DataError(f"--export: {e}", "install the German gettext catalogs or pass "
                            "--locale-dir") from None
        print_json({"exported": files})
        return
    demo.main(cache_dir=args.cache, updates=args.updates, out_dir=args.out,
              locale_dir=args.locale_dir, retrain=args.retrain)


def stopped_demo(args, argv) -> str:
    from .commands import command_line
    ckpt = os.path.join(args.cache, "base_model.ckpt")
    if os.path.exists(ckpt):
        return (f"during base-model training (checkpoint {ckpt}); resume: "
                f"{command_line(argv)}")
    return (f"after the stages cached in {args.cache}; resume: "
            f"{command_line(argv, drop=('--retrain',))}")


def cmd_reproduce(args) -> None:
    from .. import reproduce
    studies = list(reproduce.STUDIES) if args.study == "all" else [args.study]
    for study in studies:
        reproduce.reproduce(study, quick=args.quick, out_dir=args.out, cache_dir=args.cache)


def stopped_reproduce(args, argv) -> str:
    from .commands import command_line
    return f"finished stages are cached in {args.cache}; resume: {command_line(argv)}"
