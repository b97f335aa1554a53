"""The knnfast command: build datastores and indexes, tune, evaluate, translate, analyze, bench.

Models and tokenizers are read from local HF directories (save_pretrained output); nothing is
downloaded. Corpora are plain UTF-8 files: one text per line for causal LMs,
source<TAB>target per line for encoder-decoders. Results are printed as strict JSON (null
where a value is infinite or undefined). `knnfast <command> --help` shows each command's
options with their defaults and examples that run after `make demo`.

Errors are one line on stderr, "knnfast: <what> (<how to fix>)"; --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .analyze import cmd_analyze
from .commands import (cmd_build_datastore, cmd_build_index, cmd_eval_ppl, cmd_translate,
                       cmd_tune, cmd_verify, command_line, stopped_build_datastore,
                       stopped_translate)
from .errors import (DEBUG_HINT, EXIT_CODES, EXIT_DATA, EXIT_INTERNAL, EXIT_INTERRUPTED,
                     CLIError, UsageError, from_library)
from .examples import EXAMPLES
from .loading import load_model, read_corpus
from .options import (analyze_args, bench_args, build_datastore_args, build_index_args,
                      demo_args, eval_ppl_args, option, reproduce_args, translate_args,
                      tune_args, verify_args)
from .pairing import make_decoder
from .runs import cmd_bench, cmd_demo, cmd_reproduce, stopped_demo, stopped_reproduce

__all__ = ["main", "build_parser", "make_decoder", "load_model", "read_corpus", "COMMANDS",
           "EXAMPLES", "EXIT_CODES"]

#: (name, function, help, arguments) of every command, in --help order (the order in which
#: the examples run after `make demo`).
COMMANDS = (
    ("build-datastore", cmd_build_datastore,
     "capture a datastore (hidden state -> next token) from a model and a corpus",
     build_datastore_args),
    ("build-index", cmd_build_index, "train and fill a FAISS index over a datastore",
     build_index_args),
    ("verify", cmd_verify, "check a datastore, sharded datastore or teacher store against "
     "the sizes and checksums recorded when it was built", verify_args),
    ("tune", cmd_tune, "grid-search k, temperature and λ on a dev set from one retrieval",
     tune_args),
    ("eval-ppl", cmd_eval_ppl, "perplexity of the base model, kNN-LM and the oracle",
     eval_ppl_args),
    ("translate", cmd_translate, "generate with kNN (kNN-MT / kNN-LM), beam or greedy",
     translate_args),
    ("analyze", cmd_analyze, "retrieval analyses of the source papers (JSON + PNG)",
     analyze_args),
    ("bench", cmd_bench, "time fused ops against the pure-PyTorch reference", bench_args),
    ("demo", cmd_demo, "English->German kNN-MT demo on the system's gettext catalogs",
     demo_args),
    ("reproduce", cmd_reproduce, "rerun a source paper's experiments in miniature (report with "
     "the paper's claims beside ours)", reproduce_args),
)

#: Where a Ctrl-C left a command's work and how to resume (default: nothing to resume).
STOPPED = {"build-datastore": stopped_build_datastore, "translate": stopped_translate,
           "demo": stopped_demo, "reproduce": stopped_reproduce}


#: Failures during the work start on a line of their own: a progress bar may be cut mid-line.
MID_WORK = "\n"


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``knnfast:`` line (exit code 2) instead of the usage
    text, and the examples epilog kept as written."""

    def error(self, message: str):
        command = self.prog.removeprefix("knnfast").strip()
        raise UsageError(f"{command + ': ' if command else ''}{message}",
                         f"see `{self.prog} --help`")


def _exit_codes() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="knnfast", description=__doc__, epilog=_exit_codes(),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    option(parser, "--debug", action="store_true",
           help="show the Python traceback of a failure")
    # each command accepts --debug too; SUPPRESS keeps the top-level value when it is absent
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of a failure (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, func, help_, add_arguments in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                           parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its exit code (errors: one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        return 0
    except CLIError as e:
        return _fail(args, e, e.line(), e.code)
    except KeyboardInterrupt as e:
        stopped = STOPPED.get(args.command) if args is not None else None
        where = stopped(args, argv) if stopped else f"nothing was saved; rerun: {command_line(argv)}"
        return _fail(args, e, f"{MID_WORK}knnfast: interrupted ({where})", EXIT_INTERRUPTED)
    except (ValueError, OSError, RuntimeError) as e:
        # the library's own errors: clear sentences, often with their remedy
        return _fail(args, e, MID_WORK + from_library(e).line(), EXIT_DATA)
    except Exception as e:  # noqa: BLE001 - a bug; one line unless --debug
        return _fail(args, e, f"{MID_WORK}knnfast: internal error: {type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''} ({DEBUG_HINT} and report "
                     f"it)", EXIT_INTERNAL)


def _fail(args, error: BaseException, line: str, code: int) -> int:
    if args is not None and getattr(args, "debug", False):
        import traceback
        traceback.print_exception(error)
    # one write: ranks under torchrun share one stderr, and print's separate newline write
    # could land inside another rank's line
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
