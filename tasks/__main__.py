"""Command line: `python -m tasks analyze [options]` (what `make analyze` runs)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rich.console import Console

from tasks import scheduler
from tasks.api import AnalysisFailed, build_analyses, read_results, run_analysis
from tasks.common import DEFAULTS
from unlib import UserError
from unlib.data import OFFLINE_CORPUS
from unlib.report import print_summary

QUICK_TOKENS = 4096


def number(kind, variable: str, optional: bool = False):
    """argparse type for a Make variable holding a number ('' means unset when optional)."""
    def parse(text: str):
        if optional and text.strip() in ("", "none", "None"):
            return None
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{variable} must be {what}, not {text!r}") from None
    return parse


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad option as one line and exit status 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message.split(': ', 1)[-1] if 'must be' in message else message}\n")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m tasks", description="Universal neurons analysis")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    a = sub.add_parser("analyze", help="run the analysis of one checkpoint")
    a.add_argument("--models", default=DEFAULTS["models"])
    a.add_argument("--checkpoint", type=number(int, "CHECKPOINT", optional=True), default=None)
    a.add_argument("--dataset", default=OFFLINE_CORPUS)
    a.add_argument("--n-tokens", type=number(int, "N_TOKENS", optional=True), default=None)
    a.add_argument("--ctx-len", type=number(int, "CTX_LEN"), default=DEFAULTS["ctx_len"])
    a.add_argument("--reference", default="0")
    a.add_argument("--rotations", type=number(int, "ROTATIONS"), default=DEFAULTS["rotations"])
    a.add_argument("--threshold", type=number(float, "THRESHOLD", optional=True), default=None)
    a.add_argument("--top-k", type=number(int, "TOP_K", optional=True), default=None)
    a.add_argument("--device", default="auto")
    a.add_argument("--cache", default="auto")
    a.add_argument("--memory", default="", help="correlation memory budget (CORR_MEMORY), e.g. 8G")
    a.add_argument("--workers", type=number(int, "WORKERS"), default=1)
    a.add_argument("--quick", action="store_true", help=f"smoke run on {QUICK_TOKENS} tokens")
    a.add_argument("--scheduler", choices=["auto", "local", "central"], default="auto")
    a.add_argument("--scheduler-port", type=number(int, "SCHEDULER_PORT"), default=8082)
    a.add_argument("--report-tasks", help="write a JSON record of which tasks this process ran")
    s = sub.add_parser("scheduler", help="start or stop the central scheduler (luigid)")
    s.add_argument("action", choices=["start", "stop"])
    s.add_argument("--scheduler-port", type=number(int, "SCHEDULER_PORT"), default=8082)
    return p


def main(argv: list[str] | None = None) -> int:
    console = Console(stderr=False)
    p = parser()
    args = p.parse_args(argv)
    if args.command == "scheduler":
        print(scheduler.start(args.scheduler_port) if args.action == "start" else scheduler.stop())
        return 0
    n_tokens = args.n_tokens or (QUICK_TOKENS if args.quick else DEFAULTS["n_tokens"])
    try:
        roots = build_analyses(args.models, args.checkpoint, args.dataset, n_tokens, args.ctx_len, args.reference,
                               args.rotations, DEFAULTS["rotation_seed"], args.threshold, args.top_k, args.device,
                               args.cache, args.memory)
    except ValueError as exc:  # UserError and the parameter checks
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.scheduler == "auto":
        local = not scheduler.answers(args.scheduler_port)
        why = f" (no luigid answered on 127.0.0.1:{args.scheduler_port})" if local else ""
    else:
        local, why = args.scheduler == "local", ""
    where = "local" if local else f"central luigid on 127.0.0.1:{args.scheduler_port}"
    console.print(f"Scheduler: {where}{why}; device: {roots[0].device}", highlight=False)
    try:
        report = run_analysis(roots, workers=args.workers, local_scheduler=local, scheduler_port=args.scheduler_port)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AnalysisFailed as exc:
        print(str(exc), file=sys.stderr)
        print("error: the analysis did not complete; see the task errors above", file=sys.stderr)
        return exc.code
    if args.report_tasks:
        Path(args.report_tasks).write_text(json.dumps(dataclasses.asdict(report), indent=1))
    for root in roots:
        tables = read_results(root)
        title = f"{root.model_set.name} {root.results_dir().name}"
        if len(roots) > 1:
            title += f" (reference {root.model_set.models[root.reference].name})"
        print_summary(console, title, tables["layer_summary"], tables["universal"], str(root.results_dir()))
    console.print(f"Finished in {report.seconds:.1f} s: {len(report.ran_here)} tasks run here, "
                  f"{len(report.already_done)} already complete, {len(report.run_by_other_worker)} run by other workers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
