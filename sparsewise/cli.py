"""Command line: ``sparsewise report | probe | bench | train-dlrm | prune | advise``.

Bad input (unknown flags, bad values, an unwritable ``--out``) gives one clear line on stderr and
a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["main", "BENCH_SUITES"]

# suite name -> "module:function"; the function takes (args) and returns the results path
BENCH_SUITES = {
    "nm": ("sparsewise.nm.bench:run", "N:M (2:4) linear layers vs torch F.linear (issue 3)"),
    "embedding": ("sparsewise.embedding.bench:run", "embedding bags vs nn.EmbeddingBag (issue 4)"),
    "moe": ("sparsewise.moe.bench:run", "MoE blocks vs transformers' blocks (issue 5)"),
}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise CliError(f"{message} (see '{self.prog} --help')")


def _count_or_all(text: str) -> int | None:
    return None if text == "all" else _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sparsewise", description="Turn every kind of zero in a model into real speed.")
    p.add_argument("--version", action="version", version=f"sparsewise {_version()}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    r = sub.add_parser("report", help="measure this machine and the engines; write report/index.html")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="short measurements, under 3 minutes on 2 cores (default)")
    mode.add_argument("--full", dest="quick", action="store_false", help="longer, steadier measurements")
    r.add_argument("--out", default="report", help="output folder (default: report)")
    r.add_argument("--threads", type=_positive_int, default=None, help="threads (default: torch's)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    pr = sub.add_parser("probe", help="measure memory bandwidth, gathers, GEMM and GEMV limits")
    pr.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    pr.add_argument("--quick", action="store_true", help="fewer repeats")
    pr.add_argument("--threads", type=_positive_int, default=None)

    b = sub.add_parser("bench", help="run a benchmark suite and write benchmarks/results/*.json")
    b.add_argument("suite", choices=sorted(BENCH_SUITES), help="; ".join(f"{k}: {v[1]}" for k, v in BENCH_SUITES.items()))
    b.add_argument("--out", default="benchmarks/results", help="results folder")
    b.add_argument("--threads", type=_positive_int, default=None)
    b.add_argument("--quick", action="store_true", help="fewer shapes and pairs")

    d = sub.add_parser("train-dlrm", help="train a DLRM on MovieLens-100k or synthetic Criteo-like clicks")
    d.add_argument("--data", choices=("movielens", "synthetic"), default="movielens",
                   help="movielens: real MovieLens-100k (needs `make data`); synthetic: Criteo-like Zipf ids")
    d.add_argument("--epochs", type=_positive_int, default=3)
    d.add_argument("--batch-size", type=_positive_int, default=1024)
    d.add_argument("--dim", type=_positive_int, default=16, help="embedding dim of every table")
    d.add_argument("--lr", type=float, default=0.1, help="embedding Adagrad learning rate (fused)")
    d.add_argument("--dense-lr", type=float, default=3e-3, help="dense MLPs' Adam learning rate")
    d.add_argument("--samples", type=_positive_int, default=200_000, help="synthetic: training samples (test: a quarter)")
    d.add_argument("--scale", type=float, default=1e-3, help="synthetic: factor on the Criteo Kaggle table sizes")
    d.add_argument("--alpha", type=float, default=1.15, help="synthetic: Zipf exponent of the ids")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-baseline", action="store_true", help="skip the plain-torch model (nn.EmbeddingBag + torch Adagrad)")
    d.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    d.add_argument("--threads", type=_positive_int, default=None)
    d.add_argument("--no-progress", action="store_true")

    pn = sub.add_parser("prune", help="prune a causal LM to N:M, measure perplexity, save it packed")
    pn.add_argument("model", help="a transformers model folder or a GGUF file")
    pn.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="sparsegpt")
    pn.add_argument("--pattern", default="2:4", help="N:M, 0 < N < M <= 16 (default 2:4)")
    pn.add_argument("--calib", required=True, metavar="FILE",
                    help="calibration text (plain, .bz2/.gz/.xz, or a MediaWiki XML dump)")
    pn.add_argument("--eval", required=True, dest="eval_text", metavar="FILE", help="evaluation text (same formats)")
    pn.add_argument("--out", required=True, metavar="DIR", help="folder for the packed model and quality table")
    pn.add_argument("--finetune-minutes", type=float, default=0.0,
                    help="masked fine-tuning with distillation after pruning, for at most this long (default 0: none)")
    pn.add_argument("--train", metavar="FILE", help="fine-tuning text (default: the calibration text)")
    pn.add_argument("--nsamples", type=_count_or_all, default=None, metavar="N|all",
                    help="calibration windows of --seqlen tokens (default all: every window of the calibration "
                         "text; on SmolLM2-135M, 295 windows gave 4.84x dense perplexity against 5.15x for a "
                         "random 64, at 4.5x the pruning time)")
    pn.add_argument("--seqlen", type=_positive_int, default=256, help="tokens per calibration window (default 256)")
    pn.add_argument("--eval-tokens", type=_positive_int, default=16384, help="evaluation tokens (default 16384)")
    pn.add_argument("--window", type=_positive_int, default=512, help="perplexity window (default 512)")
    pn.add_argument("--stride", type=_positive_int, default=256, help="perplexity stride (default 256)")
    pn.add_argument("--lr", type=float, default=5e-5, help="fine-tuning learning rate (default 5e-5)")
    pn.add_argument("--distill", type=float, default=0.5, help="weight of the dense model's logits in fine-tuning")
    pn.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    pn.add_argument("--seed", type=int, default=0)
    pn.add_argument("--threads", type=_positive_int, default=None)
    pn.add_argument("--no-progress", action="store_true")
    a = sub.add_parser("advise", help="project each technique on TPUs, GPUs and CPUs")
    a.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _cmd_report(args) -> int:
    from .advisor.report import build_report

    path, summary = build_report(args.out, quick=args.quick, threads=args.threads, progress=not args.no_progress)
    print(summary)
    print(f"\nreport written to {path}")
    return 0


def _cmd_probe(args) -> int:
    from ._util import check_writable_dir
    from .advisor.probe import format_probe, probe, save_probe

    if args.json:
        from pathlib import Path

        check_writable_dir(Path(args.json).resolve().parent)
    doc = probe(quick=args.quick, threads=args.threads, progress=lambda m: print(f"measuring {m} ...", file=sys.stderr))
    save_probe(doc)
    print(format_probe(doc))
    if args.json:
        save_probe(doc, args.json)
        print(f"written to {args.json}")
    return 0


def _cmd_bench(args) -> int:
    from ._util import check_writable_dir

    check_writable_dir(args.out)
    target, _ = BENCH_SUITES[args.suite]
    module, func = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("sparsewise"):
            raise NotImplementedError(f"benchmark suite '{args.suite}' is not built yet") from None
        raise
    path = getattr(mod, func)(args)
    print(f"results written to {path}")
    return 0


def _cmd_train_dlrm(args) -> int:
    from ._util import atomic_write_json, threads
    from .embedding.dlrm import DLRM, TorchDLRM, train

    if args.json:
        from pathlib import Path

        from ._util import check_writable_dir

        check_writable_dir(Path(args.json).resolve().parent)
    for name in ("lr", "dense_lr", "scale"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.data == "movielens":
        from .embedding.data import movielens_100k

        tr, te = movielens_100k()
    else:
        from .embedding.data import synthetic_criteo

        tr = synthetic_criteo(args.samples, scale=args.scale, alpha=args.alpha, world_seed=args.seed, seed=1)
        te = synthetic_criteo(max(1000, args.samples // 4), scale=args.scale, alpha=args.alpha, world_seed=args.seed, seed=2)
    print(f"data: {tr.name}: {len(tr):,} train / {len(te):,} test samples, {len(tr.features)} sparse features, "
          f"{sum(tr.rows.values()):,} embedding rows, {tr.labels.mean().item():.1%} positive")
    kw = dict(epochs=args.epochs, batch_size=args.batch_size, dense_lr=args.dense_lr, progress=not args.no_progress)
    results = {}
    with threads(args.threads):
        model = DLRM.for_data(tr, dim=args.dim, lr=args.lr, seed=args.seed)
        baseline = None if args.no_baseline else TorchDLRM.from_dlrm(model)  # same initial weights
        results["sparsewise"] = train(model, tr, te, desc="sparsewise DLRM", **kw)
        if baseline is not None:
            results["torch"] = train(baseline, tr, te, desc="torch DLRM", **kw)
    for name, r in results.items():
        print(f"{name:>10}: test AUC {r.auc:.4f}, {r.samples_per_s:,.0f} samples/s (train), final loss {r.final_loss:.4f}")
    if "torch" in results:
        a, b = results["sparsewise"], results["torch"]
        print(f"AUC difference {a.auc - b.auc:+.4f}; throughput {a.samples_per_s / b.samples_per_s:.2f}x the plain torch model")
    if args.json:
        import dataclasses

        atomic_write_json(args.json, {"data": tr.name, "args": {k: v for k, v in vars(args).items() if k != "command"},
                                      "results": {k: dataclasses.asdict(v) for k, v in results.items()}})
    return 0


def _cmd_prune(args) -> int:
    from pathlib import Path

    from ._util import check_writable_dir, threads
    from .nm.pipeline import PruneLMConfig, prune_lm, quality_markdown

    check_writable_dir(Path(args.out).resolve().parent)
    cfg = PruneLMConfig(method=args.method, pattern=args.pattern, nsamples=args.nsamples, seqlen=args.seqlen,
                        eval_tokens=args.eval_tokens, window=args.window, stride=args.stride,
                        finetune_minutes=args.finetune_minutes, finetune_lr=args.lr, distill_alpha=args.distill,
                        dtype=args.dtype, seed=args.seed)
    with threads(args.threads):
        res = prune_lm(args.model, args.calib, args.eval_text, args.out, cfg, train=args.train,
                       progress=not args.no_progress)
    print()
    print(quality_markdown(res))
    return 0


def _cmd_not_built(args) -> int:
    raise NotImplementedError(f"'sparsewise {args.command}' is not built yet (see the README's status table)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        handler = {"report": _cmd_report, "probe": _cmd_probe, "bench": _cmd_bench, "train-dlrm": _cmd_train_dlrm,
                   "prune": _cmd_prune, "advise": _cmd_not_built}[args.command]
        return handler(args)
    except CliError as exc:
        print(f"sparsewise: error: {exc}", file=sys.stderr)
        return 2
    except NotImplementedError as exc:
        print(f"sparsewise: {exc}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError) as exc:
        print(f"sparsewise: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparsewise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
