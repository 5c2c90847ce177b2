"""Command line: `python -m tasks analyze [options]` (what `make analyze` runs), also installed
as the `universal-neurons` command, which takes the seed document's flags too (seed_argv)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from rich.console import Console

from tasks import scheduler
from tasks.api import AnalysisFailed, build_analyses, check_workers, plan_correlation, read_results, run_analysis
from tasks.common import BATCH_SIZE, DEFAULTS, EXECUTION_DEFAULTS, store
from unlib import UserError
from tasks.report import CompareCheckpoints, RunReport
from unlib.cleanup import unused_files
from unlib.plan import describe, measured_rates
from unlib.terminal_report import print_ablation, print_comparison, print_summary

QUICK_TOKENS = 4096
COMMANDS = ("analyze", "report", "compare", "plan", "scheduler", "clean-store")
TEST_MODELS = "toy-zoo-mini"  # --test: a smoke run on the mini zoo (unless --models says otherwise)
SEED_USAGE = f"""The seed document's flags, without a command:
  --test                          a smoke run: analyze --quick --models {TEST_MODELS} (trains the mini zoo once)
  --checkpoint N                  analyze --checkpoint N
  --compare-checkpoints "100 250" compare --checkpoints "100 250"
with any option of analyze (or compare), e.g. --test --compare-checkpoints "100 300"."""


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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models", default=DEFAULTS["models"])
    common.add_argument("--dataset", default="", help="empty: the model set's default dataset")
    common.add_argument("--n-tokens", type=number(int, "N_TOKENS", optional=True), default=None)
    common.add_argument("--ctx-len", type=number(int, "CTX_LEN", optional=True), default=None)
    common.add_argument("--exclude-tokens", default="", help="EXCLUDE_TOKENS; empty: the model set's default")
    common.add_argument("--reference", default=str(DEFAULTS["reference"]))
    common.add_argument("--rotations", type=number(int, "ROTATIONS"), default=DEFAULTS["rotations"])
    common.add_argument("--threshold", type=number(float, "THRESHOLD", optional=True), default=None)
    common.add_argument("--top-k", type=number(int, "TOP_K", optional=True), default=None)
    common.add_argument("--ablation", default=DEFAULTS["ablation"], help="ABLATION: mean (default) or zero")
    common.add_argument("--ablation-tokens", type=number(int, "ABLATION_TOKENS", optional=True), default=None,
                        help="held-out tokens of the ablation (default: a fifth of N_TOKENS)")
    common.add_argument("--ablation-samples", type=number(int, "ABLATION_SAMPLES", optional=True), default=None,
                        help=f"matched random neuron sets (default {DEFAULTS['ablation_samples']})")
    common.add_argument("--device", default=EXECUTION_DEFAULTS["device"])
    common.add_argument("--cache", default=EXECUTION_DEFAULTS["cache"])
    common.add_argument("--memory", default="", help="correlation memory budget (CORR_MEMORY), e.g. 8G")
    common.add_argument("--workers", type=number(int, "WORKERS"), default=EXECUTION_DEFAULTS["workers"])
    common.add_argument("--parallel", type=number(int, "PARALLEL", optional=True), default=None,
                        help="correlation blocks to split the work into, at least (default: WORKERS)")
    common.add_argument("--batch-size", type=number(int, "BATCH_SIZE", optional=True), default=None,
                        help=f"sequences per forward pass (default {BATCH_SIZE})")
    common.add_argument("--quick", action="store_true", help=f"smoke run on {QUICK_TOKENS} tokens")
    common.add_argument("--scheduler", choices=["auto", "local", "central"], default=EXECUTION_DEFAULTS["scheduler"])
    common.add_argument("--scheduler-port", type=number(int, "SCHEDULER_PORT"),
                        default=EXECUTION_DEFAULTS["scheduler_port"])
    common.add_argument("--report-tasks", help="write a JSON record of which tasks this process ran")
    p = OneLineParser(prog="python -m tasks", description="Universal neurons analysis", epilog=SEED_USAGE,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, text in [("analyze", "analyse one checkpoint and write its report"),
                       ("report", "rebuild the report of an analysis (running what is missing)"),
                       ("plan", "print the correlation's plan (passes, memory, bytes, FLOPs, time); run nothing")]:
        sub.add_parser(name, parents=[common], help=text).add_argument(
            "--checkpoint", type=number(int, "CHECKPOINT", optional=True), default=None)
    c = sub.add_parser("compare", parents=[common], help="analyse several checkpoints and compare them")
    c.add_argument("--checkpoints", default=EXECUTION_DEFAULTS["checkpoints"],
                   help=f'training steps (default "{EXECUTION_DEFAULTS["checkpoints"]}")')
    clean = sub.add_parser("clean-store", help="list what the store holds that no output needs; --confirm removes it")
    clean.add_argument("--confirm", action="store_true", help="CONFIRM=1: remove the files listed")
    s = sub.add_parser("scheduler", help="start or stop the central scheduler (luigid)")
    s.add_argument("action", choices=["start", "stop"])
    s.add_argument("--scheduler-port", type=number(int, "SCHEDULER_PORT"), default=EXECUTION_DEFAULTS["scheduler_port"])
    s.add_argument("--scheduler-host", default=scheduler.LOCAL,
                   help="SCHEDULER_HOST: the address luigid listens on; one other hosts reach to share it")
    s.add_argument("--gpus", type=number(int, "SCHEDULER_GPUS", optional=True), default=None,
                   help="SCHEDULER_GPUS: GPUs all hosts' workers share (default: this host's, at least 1)")
    return p


def seed_argv(argv: list[str]) -> list[str]:
    """The seed's command line as this one's (SEED_USAGE): --test is analyze --quick on the
    mini zoo, --compare-checkpoints the compare command; a command line that starts with a
    command (or asks for help) is left as it is."""
    if argv and (argv[0] in COMMANDS or argv[0] in ("-h", "--help")):
        return argv
    command, rest, test, i = "analyze", [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--test":
            test = True
        elif arg == "--compare-checkpoints" and i + 1 < len(argv):
            command, i = "compare", i + 1
            rest += ["--checkpoints", argv[i]]
        elif arg.startswith("--compare-checkpoints="):
            command = "compare"
            rest.append("--checkpoints=" + arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if test:
        given = any(a == "--models" or a.startswith("--models=") for a in rest)
        rest = ["--quick", *([] if given else ["--models", TEST_MODELS]), *rest]
    return [command, *rest]


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(s) for s in text.replace(",", " ").split()})
    except ValueError:
        raise UserError(f"CHECKPOINTS={text!r} must be training steps separated by spaces, e.g. \"100 250 500 1000\"") \
            from None
    if len(steps) < 2:
        raise UserError(f"CHECKPOINTS={text!r} needs at least two different training steps to compare")
    return steps


def build(args) -> list:
    """The Luigi root tasks of the command (raises ValueError/UserError on bad input)."""
    # only an unset N_TOKENS takes the default: 0 or a negative number is refused by build_analyses
    n_tokens = args.n_tokens if args.n_tokens is not None else (QUICK_TOKENS if args.quick else DEFAULTS["n_tokens"])
    check_workers(args.workers)
    steps = parse_steps(args.checkpoints) if args.command == "compare" else [args.checkpoint]
    roots = [root for step in steps for root in build_analyses(
        args.models, step, dataset=args.dataset, n_tokens=n_tokens, ctx_len=args.ctx_len, reference=args.reference,
        rotations=args.rotations, threshold=args.threshold, top_k=args.top_k, device=args.device, cache=args.cache,
        memory=args.memory, exclude_tokens=args.exclude_tokens,
        batch_size=BATCH_SIZE if args.batch_size is None else args.batch_size, ablation=args.ablation,
        ablation_tokens=args.ablation_tokens,
        ablation_samples=DEFAULTS["ablation_samples"] if args.ablation_samples is None else args.ablation_samples,
        workers=args.workers, parallel=args.parallel)]
    if args.command == "compare":
        return [root.clone(CompareCheckpoints, checkpoints=steps) for root in roots if root.checkpoint == steps[0]]
    reports = [root.clone(RunReport) for root in roots]
    if args.command == "report":
        for task in reports:
            Path(task.output().path).unlink(missing_ok=True)
    return reports


def print_plan(console: Console, args) -> int:
    """`make plan`: the correlation's plan for the analysis these arguments describe."""
    n_tokens = args.n_tokens if args.n_tokens is not None else (QUICK_TOKENS if args.quick else DEFAULTS["n_tokens"])
    try:
        names, plan = plan_correlation(args.models, args.checkpoint, n_tokens, args.reference, args.rotations,
                                       args.device, args.memory, args.workers, args.parallel)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in describe(plan, names, measured_rates(plan)):
        console.print(line, highlight=False, soft_wrap=True)
    return 0


def clean_store(console: Console, confirm: bool) -> int:
    """`make clean-store`: list the files no output needs (unlib.cleanup), and remove them with CONFIRM=1."""
    root = store().root
    found = unused_files(root) if root.is_dir() else []
    for item in found:
        console.print(f"{item.bytes / 2**20:10,.2f} MiB  {item.path.relative_to(root)}  ({item.why})", highlight=False,
                      soft_wrap=True)
    total = sum(item.bytes for item in found) / 2**20
    if not found:
        console.print(f"{root}: nothing to clean", highlight=False, soft_wrap=True)
    elif confirm:
        for item in found:
            item.path.unlink(missing_ok=True)
        console.print(f"removed {len(found)} files: {total:,.2f} MiB freed", highlight=False)
    else:
        console.print(f"{len(found)} files, {total:,.2f} MiB: `make clean-store CONFIRM=1` removes them", highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    console = Console(stderr=False)
    args = parser().parse_args(seed_argv(sys.argv[1:] if argv is None else argv))
    if args.command == "scheduler":
        code, line = scheduler.start(args.scheduler_port, args.scheduler_host, args.gpus) \
            if args.action == "start" else scheduler.stop()
        print(line, file=sys.stderr if code else sys.stdout)
        return code
    if args.command == "plan":
        return print_plan(console, args)
    if args.command == "clean-store":
        return clean_store(console, args.confirm)
    try:
        roots = build(args)
    except ValueError as exc:  # UserError and the parameter checks
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before any work started", file=sys.stderr)
        return 130
    central, why_not = (None, None) if args.scheduler == "local" else scheduler.find(args.scheduler_port)
    if args.scheduler == "central" and why_not:
        print(f"error: SCHEDULER=central but {why_not}; start this store's with `make scheduler` "
              f"(another SCHEDULER_PORT if that one is taken) or use SCHEDULER=auto", file=sys.stderr)
        return 2
    why = f" ({why_not})" if why_not else ""
    where = f"central luigid on {central['host']}:{central['port']}" if central else "local"
    console.print(f"Scheduler: {where}{why}; device: {roots[0].device}", highlight=False)
    try:
        report = run_analysis(roots, workers=args.workers,
                              central=(central["host"], central["port"]) if central else None)
    except KeyboardInterrupt:
        print("interrupted: finished files are kept and nothing unfinished counts as done; run the same command "
              "again to resume", file=sys.stderr)
        return 130
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
        if args.command == "compare":
            print_comparison(console, root.output_dir())
            continue
        tables = read_results(root)
        title = f"{root.model_set.name} {root.results_dir().name}"
        if len(roots) > 1:
            title += f" (reference {root.model_set.models[root.reference].name})"
        print_summary(console, title, tables["layer_summary"], tables["universal"], str(root.results_dir()))
        print_ablation(console, root.results_dir())
        console.print(f"Report: [bold]{root.output().path}[/bold]")
    console.print(f"Finished in {report.seconds:.1f} s: {len(report.ran_here)} tasks run here, "
                  f"{len(report.already_done)} already complete, {len(report.run_by_other_worker)} run by other workers")
    return 0


def entry_point() -> None:
    """The `universal-neurons` command (pyproject.toml [project.scripts])."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
