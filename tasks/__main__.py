"""Command line: `python -m tasks analyze [options]` (what `make analyze` runs)."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from tasks.api import (AnalysisFailed, build_analysis, central_scheduler_answers, read_results,
                       run_analysis)
from tasks.common import DEFAULTS
from unlib.data import OFFLINE_CORPUS, DatasetError
from unlib.models import ModelError
from unlib.report import print_summary

QUICK_TOKENS = 4096


def _optional(kind):
    def parse(text: str):
        return None if text in ("", "none", "None") else kind(text)
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks", description="Universal neurons analysis")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="run the analysis of one checkpoint")
    a.add_argument("--models", default=DEFAULTS["models"])
    a.add_argument("--checkpoint", type=_optional(int), default=None)
    a.add_argument("--dataset", default=OFFLINE_CORPUS)
    a.add_argument("--n-tokens", type=_optional(int), default=None)
    a.add_argument("--ctx-len", type=int, default=DEFAULTS["ctx_len"])
    a.add_argument("--reference", default="0")
    a.add_argument("--rotations", type=int, default=DEFAULTS["rotations"])
    a.add_argument("--threshold", type=_optional(float), default=None)
    a.add_argument("--top-k", type=_optional(int), default=None)
    a.add_argument("--device", default="auto")
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--quick", action="store_true", help=f"smoke run on {QUICK_TOKENS} tokens")
    a.add_argument("--scheduler", choices=["auto", "local", "central"], default="auto")
    a.add_argument("--scheduler-port", type=int, default=8082)
    return p


def main(argv: list[str] | None = None) -> int:
    console = Console(stderr=False)
    p = parser()
    # argparse's own errors (a non-number for N_TOKENS, say) are one line and exit 2.
    args = p.parse_args(argv)
    n_tokens = args.n_tokens or (QUICK_TOKENS if args.quick else DEFAULTS["n_tokens"])
    try:
        root = build_analysis(args.models, args.checkpoint, args.dataset, n_tokens, args.ctx_len, args.reference,
                              args.rotations, DEFAULTS["rotation_seed"], args.threshold, args.top_k, args.device)
    except (ModelError, DatasetError, ValueError) as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return 2
    if args.scheduler == "auto":
        local = not central_scheduler_answers(port=args.scheduler_port)
        why = f" (no luigid answered on 127.0.0.1:{args.scheduler_port})" if local else ""
    else:
        local, why = args.scheduler == "local", ""
    where = "local" if local else f"central luigid on 127.0.0.1:{args.scheduler_port}"
    console.print(f"Scheduler: {where}{why}; device: {root.device}; results: {root.results_dir()}", highlight=False)
    try:
        seconds = run_analysis(root, workers=args.workers, local_scheduler=local, scheduler_port=args.scheduler_port)
    except AnalysisFailed as exc:
        console.print(str(exc), highlight=False)
        console.print("[bold red]error:[/bold red] the analysis did not complete; see the task errors above")
        return exc.code
    tables = read_results(root)
    print_summary(console, f"{root.model_set.name} {root.results_dir().name}", tables["layer_summary"],
                  tables["universal"], str(root.results_dir()))
    console.print(f"Finished in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
