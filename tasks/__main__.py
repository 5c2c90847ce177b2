"""Command line: `python -m tasks analyze [options]` (what `make analyze` runs), also installed
as the `universal-neurons` command, which takes the seed document's flags too (seed_argv)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from tasks import scheduler
from tasks.common import show_notes
from tasks.api import AnalysisFailed, build_analyses, plan_correlation, read_results, run_analysis
from tasks.report import CompareCheckpoints, RunReport
from tasks.targets import store
from unlib import UserError
from unlib.cleanup import unused_files
from unlib.config import COMMANDS, PARAMETERS, RUN_COMMANDS, RunConfig, check_checkpoints, resolve
from unlib.plan import describe, measured_rates
from unlib.terminal_report import print_ablation, print_comparison, print_summary

TEST_MODELS = "toy-zoo-mini"  # --test: a smoke run on the mini zoo (unless --models says otherwise)
SEED_USAGE = f"""The seed document's flags, without a command:
  --test                          a smoke run: analyze --quick --models {TEST_MODELS} (trains the mini zoo once)
  --checkpoint N                  analyze --checkpoint N
  --compare-checkpoints "100 250" compare --checkpoints "100 250"
with any option of analyze (or compare), e.g. --test --compare-checkpoints "100 300"."""


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad option as one line and exit status 2, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message.split(': ', 1)[-1] if 'must be' in message else message}\n")


HELP = {"analyze": "analyse one checkpoint and write its report",
        "report": "rebuild the report of an analysis (running what is missing)",
        "plan": "print the correlation's plan (passes, memory, bytes, FLOPs, time); run nothing",
        "compare": "analyse several checkpoints and compare them",
        "scheduler": "start or stop the central scheduler (luigid)",
        "clean-store": "list what the store holds that no output needs; --confirm removes it"}


def parser() -> argparse.ArgumentParser:
    """The command line: each command takes the run parameters (unlib.config.PARAMETERS) it
    uses, as flags; an option not given is None (unset), so RunConfig's default applies."""
    # the name it was called by: `universal-neurons` (the installed script) or `python -m tasks`
    called = Path(sys.argv[0]).name
    prog = "python -m tasks" if called in ("__main__.py", "-c", "") else called
    p = OneLineParser(prog=prog, description="Universal neurons analysis", epilog=SEED_USAGE,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in COMMANDS:
        c = sub.add_parser(command, help=HELP[command])
        if command == "scheduler":
            c.add_argument("action", choices=["start", "stop"])
        for param in (q for q in PARAMETERS if command in q.commands):
            default = "" if param.default is None else f" (default {param.default})"
            text = f"{param.make_variable}: {param.help}{default}".replace("%", "%%")  # argparse formats help with %
            if param.kind is bool:
                c.add_argument(param.flag, action="store_const", const=True, help=text)
            else:
                c.add_argument(param.flag, type=option_type(param), help=text)
        c.add_argument("--from-make", action="store_true",
                       help="also take the command's variables from the environment make runs it with")
        if command in RUN_COMMANDS:
            c.add_argument("--report-tasks", help="write a JSON record of which tasks this process ran")
    return p


def option_type(param):
    """argparse type of a parameter's flag: its parse(), a bad value reported in one line."""
    def parse(text: str):
        try:
            return param.parse(text)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = param.make_variable
    return parse


def given_values(args) -> dict:
    """The run parameters the command line gave (with --from-make, also make's variables)."""
    values = from_make(args.command) if args.from_make else {}
    values.update({p.name: getattr(args, p.name) for p in PARAMETERS
                   if args.command in p.commands and getattr(args, p.name) is not None})
    return values


def from_make(command: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The values make hands a command (`--from-make`): each of the command's variables set in
    the environment make runs it with (a variable given empty, as `N_TOKENS=`, stays unset).
    A variable on make's command line that is not one of them but close to one
    (CHECKPIONT=500) is refused, since make would silently ignore it."""
    environ = os.environ if environ is None else environ
    known = [p.make_variable for p in PARAMETERS]
    given = re.findall(r"(?:^| )([A-Z][A-Z0-9_]*)=", environ.get("MAKEFLAGS", "").partition(" -- ")[2])
    for name in given:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        if name not in known and close:
            raise UserError(f"{name} is not a variable of make {command}: did you mean {close[0]}? "
                            f"(docs/reference.md lists them all)")
    values = {}
    for p in PARAMETERS:
        if command in p.commands and (text := environ.get(p.make_variable, "")).strip():
            values[p.name] = p.parse(text)
    return values


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


def build(command: str, config: RunConfig) -> list:
    """The Luigi root tasks of the command (raises ValueError/UserError on bad input)."""
    steps = check_checkpoints(config.checkpoints, None).split() if command == "compare" else [config.checkpoint]
    roots = [root for step in steps
             for root in build_analyses(dataclasses.replace(config, checkpoint=None if step is None else int(step)))]
    if command == "compare":
        steps = [int(s) for s in steps]
        return [root.clone(CompareCheckpoints, checkpoints=steps) for root in roots if root.checkpoint == steps[0]]
    reports = [root.clone(RunReport) for root in roots]
    if command == "report":
        for task in reports:
            Path(task.output().path).unlink(missing_ok=True)
    return reports


def print_plan(console: Console, config: RunConfig) -> int:
    """`make plan`: the correlation's plan for the analysis these parameters describe."""
    try:
        names, plan = plan_correlation(config)
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


# stdout's width in a file or pipe (rich would assume 80 columns and wrap paths and truncate
# table cells): wide enough for every table the run prints
PIPE_WIDTH = 240


def stdout_console() -> Console:
    """The console the run's summary prints to: a terminal's own width; in a file or pipe
    PIPE_WIDTH, whatever $COLUMNS says (a test runner or CI may export the width of a terminal
    the output never reaches)."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPE_WIDTH)


@contextlib.contextmanager
def ctrl_c_never_lost() -> Iterator[None]:
    """Ctrl-C stops the run even when it lands while the process forks a worker: Python ignores
    a KeyboardInterrupt raised in os.fork's callbacks (logging's lock release), and the run
    would go on to its end. So until one has left this block, it is raised again every 0.2 s."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    pending = False

    def interrupt(signum, frame):
        nonlocal pending
        pending = True
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        raise KeyboardInterrupt

    def again(signum, frame):
        if pending:
            interrupt(signum, frame)

    previous = signal.signal(signal.SIGINT, interrupt), signal.signal(signal.SIGALRM, again)
    try:
        yield
    finally:
        pending = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGALRM, previous[1])


def say_what_report_runs(roots: list[RunReport]) -> None:
    """make report rebuilds a finished analysis's page; where the variables describe an analysis
    not finished (another THRESHOLD, say), it runs that first: said in one line, not silently."""
    for root in roots:
        if not root.requires()["analysis"].complete():
            print(f"make report: no finished analysis in {root.run_dir()}: running it first (what it shares with "
                  f"finished runs, such as their correlations, is reused)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    console = stdout_console()
    show_notes()
    args = parser().parse_args(seed_argv(sys.argv[1:] if argv is None else argv))
    try:
        given = given_values(args)
        config = RunConfig(**given)
        if args.command == "scheduler":
            resolve(config, only=("scheduler_port", "scheduler_gpus"))
            code, line = scheduler.start(config.scheduler_port, config.scheduler_host, config.scheduler_gpus) \
                if args.action == "start" else scheduler.stop()
            print(line, file=sys.stderr if code else sys.stdout)
            return code
        if args.command == "plan":
            return print_plan(console, config)
        if args.command == "clean-store":
            return clean_store(console, config.confirm)
        roots = build(args.command, config)
    except ValueError as exc:  # UserError and the parameter checks
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before any work started", file=sys.stderr)
        return 130
    # unless SCHEDULER_PORT is given, this store's luigid wherever its record says it listens
    port = config.scheduler_port if "scheduler_port" in given else scheduler.store_port(config.scheduler_port)
    central, why_not = (None, None) if config.scheduler == "local" else scheduler.find(port)
    if config.scheduler == "central" and why_not:
        print(f"error: SCHEDULER=central but {why_not}; start this store's with `make scheduler` "
              f"(another SCHEDULER_PORT if that one is taken) or use SCHEDULER=auto", file=sys.stderr)
        return 2
    why = f" ({why_not})" if why_not else ""
    where = f"central luigid on {central['host']}:{central['port']}" if central else "local"
    console.print(f"Scheduler: {where}{why}; device: {roots[0].device}", highlight=False)
    if args.command == "report":
        say_what_report_runs(roots)
    try:
        with ctrl_c_never_lost():
            report = run_analysis(roots, workers=config.workers,
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
        title = f"{root.model_set.name} {root.run_name()}"
        if len(roots) > 1:
            title += f" (reference {root.model_set.models[root.reference].name})"
        print_summary(console, title, tables["layer_summary"], tables["universal"], str(root.results_dir()),
                      tables["families"], tables["family_counts"])
        print_ablation(console, root.run_dir())
        console.print(f"Report: [bold]{root.output().path}[/bold]", soft_wrap=True)
    console.print(f"Finished in {report.seconds:.1f} s: {len(report.ran_here)} tasks run here, "
                  f"{len(report.already_done)} already complete, {len(report.run_by_other_worker)} run by other workers")
    return 0


def entry_point() -> None:
    """The `universal-neurons` command (pyproject.toml [project.scripts])."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
