"""The run parameters are described once (unlib.config.PARAMETERS) and everything else follows:
the command line's flags, the Makefile (which hands its variables over with --from-make), the
Python API (RunConfig), the Luigi parameters and docs/reference.md's table. And the modules of
tasks/ and unlib/ each import alone, with no cycle among them."""
import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import luigi
import pytest

from conftest import REPO
from tasks.__main__ import from_make, parser
from tasks.params import parameter
from unlib import UserError
from unlib.config import PARAMETERS, RunConfig, resolve, variables_table
from unlib.model_sets import ZOOS

PACKAGES = ("tasks", "unlib")


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it (function-local imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def test_no_two_modules_import_each_other():
    """No import cycle of any length among the modules of tasks/ and unlib/ (a package's
    __init__ importing its own modules excepted: that is how a package exposes them)."""
    known = modules()
    graph = {name: {m for m in imports(path, set(known)) if m != name and not name.startswith(m + ".")
                    and not (path.name == "__init__.py" and m.startswith(name + "."))}
             for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            assert state.get(other) != 1, "import cycle: " + " -> ".join(trail + [name, other])
            if other not in state:
                visit(other, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_each_module_imports_alone():
    """Each module imports in an interpreter that has imported none of the project before
    (only the third-party packages are shared, for speed)."""
    names = sorted(modules())
    code = ("import importlib, sys, torch, luigi, transformers, pandas, h5py\n"
            f"for name in {names!r}:\n"
            "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('tasks', 'unlib')]:\n"
            "        del sys.modules[loaded]\n"
            "    importlib.import_module(name)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_every_command_takes_exactly_its_parameters_as_flags():
    commands = parser()._subparsers._group_actions[0].choices
    for command, sub in commands.items():
        flags = {a.option_strings[0] for a in sub._actions if a.option_strings} - {"-h", "--from-make", "--report-tasks"}
        assert flags == {p.flag for p in PARAMETERS if command in p.commands}, command


def test_every_commands_help_prints(capsys):
    """--help formats each parameter's help (argparse reads % as a format: "80 % of ...")."""
    for command in parser()._subparsers._group_actions[0].choices:
        with pytest.raises(SystemExit) as exit_:
            parser().parse_args([command, "--help"])
        assert exit_.value.code == 0 and "--from-make" in capsys.readouterr().out, command


@pytest.mark.parametrize("argv0, usage", [("/env/bin/universal-neurons", "usage: universal-neurons "),
                                          (str(REPO / "tasks" / "__main__.py"), "usage: python -m tasks ")])
def test_the_usage_names_the_command_as_it_was_called(monkeypatch, capsys, argv0, usage):
    monkeypatch.setattr(sys, "argv", [argv0])
    parser().print_usage()
    assert capsys.readouterr().out.startswith(usage)


def test_the_luigi_parameters_follow_from_the_description():
    """A task's run parameter is significant exactly when the description says it changes
    outputs, with its default, unless the run resolves it first (then the task requires it)."""
    from tasks.analysis import UniversalNeuronsAnalysis

    described = {p.name: p for p in PARAMETERS}
    declared = dict(UniversalNeuronsAnalysis.get_params())
    for name in set(declared) & set(described):
        if name == "reference":  # the task's is the resolved index (REFERENCE may name a model or all)
            continue
        p, param = described[name], declared[name]
        assert param.significant == bool(p.changes), name
        assert type(param) is type(parameter(name)), name
        if not (p.set_default or p.resolved):
            assert param._default == p.default, name
        else:
            assert param._default is luigi.parameter._no_value, name


def test_the_makefile_names_no_run_variable():
    """Make hands every variable over (--from-make): the Makefile lists none of them itself."""
    text = (REPO / "Makefile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not [p.make_variable for p in PARAMETERS if f"$({p.make_variable})" in code or f"{p.make_variable} ?=" in code]


def test_make_variables_reach_the_command(tmp_path):
    """`make plan` with variables (one given empty, which stays unset), and a misspelled one
    refused in one line naming the variable meant."""
    env = {**os.environ, "UNLIB_STORE": str(tmp_path / "store"), "HF_HUB_OFFLINE": "1"}
    run = lambda *args: subprocess.run(["make", "-s", "plan", f"PYTHON={sys.executable}", "MODELS=toy-zoo-mini",  # noqa: E731
                                        *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    proc = run("N_TOKENS=8192", "ROTATIONS=3", "CORR_MEMORY=", "WORKERS=1")
    assert proc.returncode == 0, proc.stderr
    assert "8,192 tokens" in proc.stdout and "12 Haar rotations" in proc.stdout, proc.stdout
    proc = run("CHECKPIONT=100")
    assert proc.returncode == 2 and proc.stderr.splitlines()[0] == (
        "error: CHECKPIONT is not a variable of make plan: did you mean CHECKPOINT? (docs/reference.md lists them all)")


def test_from_make_reads_only_the_commands_variables():
    environ = {"N_TOKENS": "5000", "THRESHOLD": "", "CHECKPOINTS": "1 2", "QUICK": "yes", "MAKEFLAGS": " -- N_TOKENS=5000"}
    assert from_make("analyze", environ) == {"n_tokens": 5000, "quick": True}
    assert from_make("compare", environ) == {"n_tokens": 5000, "checkpoints": "1 2", "quick": True}
    with pytest.raises(UserError, match="QUICK='maybe' must be 1"):
        from_make("analyze", {"QUICK": "maybe"})


def test_the_reference_table_is_written_from_the_description():
    text = (REPO / "docs" / "reference.md").read_text()
    assert variables_table() in text, "docs/reference.md is stale: run `python -m unlib.config`"
    details = text[text.index("<!-- END run variables -->"):]
    missing = [p.make_variable for p in PARAMETERS if f"- `{p.make_variable}`" not in details]
    assert not missing, f"docs/reference.md explains no {missing}"


def test_the_api_takes_every_parameter_by_name():
    assert [f.name for f in dataclasses.fields(RunConfig)] == [p.name for p in PARAMETERS]
    assert RunConfig().n_tokens == 100_000 and RunConfig(top_k=5).top_k == 5
    with pytest.raises(TypeError, match="n_token"):
        RunConfig(n_token=5)


def test_plan_resolution_reads_no_store(tmp_path, monkeypatch):
    """make plan resolves the correlation's parameters from the models' shapes alone."""
    monkeypatch.setenv("UNLIB_STORE", str(tmp_path / "absent"))
    run = resolve(RunConfig(models="toy-zoo-mini", reference="all", corr_memory="1G", quick=True), planning=True)
    assert run.references == [0, 1, 2] and run.n_tokens == 4096 and run.memory_budget == 2**30
    assert not (tmp_path / "absent").exists()


def test_final_weights_are_the_step_they_are_where_it_is_known():
    """A zoo's final weights are its last step (the same files as CHECKPOINT=<that step>); a
    hub model's main revision is not known to be a checkpoint, so it stays `final`."""
    zoo = resolve(RunConfig(models="toy-zoo-mini", corr_memory="1G"), planning=True)
    assert zoo.checkpoint == max(ZOOS["toy-zoo-mini"].save_steps) == 300
    assert resolve(RunConfig(models="stanford-gpt2-small", corr_memory="8G", device="cpu"),
                   planning=True).checkpoint is None


def test_a_default_given_explicitly_is_the_same_run(tmp_path, monkeypatch):
    """`excess_threshold=0.3` (the README's API example) on the toy zoo, whose threshold is 0.3,
    wrote checkpoint-1000_threshold-0.3/, a copy of checkpoint-1000/; a fifth of N_TOKENS given
    as ABLATION_TOKENS likewise made an ablation subfolder."""
    from tasks.api import build_analyses
    from unlib.model_sets import resolve_model_set

    monkeypatch.setenv("UNLIB_STORE", str(tmp_path))

    def folder(**given) -> str:
        return str(build_analyses(RunConfig(models="toy-zoo-mini", checkpoint=300, device="cpu", corr_memory="1G",
                                            **given))[0].run_dir().relative_to(tmp_path))

    default = folder()
    assert default == "results/toy-zoo-mini/checkpoint-300"
    assert folder(threshold=resolve_model_set("toy-zoo-mini").defaults.threshold) == folder(ablation_tokens=20_000) == default
    assert folder(threshold=0.2) == default + "_threshold-0.2"
    assert folder(ablation_tokens=5_000) == default + "/ablation_ablation_tokens-5000"


def test_make_report_says_when_it_runs_an_analysis_first(tmp_path, monkeypatch, capsys):
    """`make report THRESHOLD=0.2` with no such analysis finished runs one: said, not silent."""
    from tasks.__main__ import build, say_what_report_runs

    monkeypatch.setenv("UNLIB_STORE", str(tmp_path))
    roots = build("report", RunConfig(models="toy-zoo-mini", checkpoint=300, threshold=0.2, device="cpu",
                                      corr_memory="1G"))
    say_what_report_runs(roots)
    assert capsys.readouterr().err.startswith(f"make report: no finished analysis in {roots[0].run_dir()}: "
                                              f"running it first")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the ignored one, reported
def test_a_ctrl_c_that_python_ignores_is_raised_again():
    """A KeyboardInterrupt raised where Python only reports it (here a __del__; in a run, the
    at-fork callbacks of the fork that starts a worker) used to be lost, and the run went on."""
    import signal
    import time

    from tasks.__main__ import ctrl_c_never_lost

    class InterruptedWhileFreed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs here, and its KeyboardInterrupt is ignored

    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_never_lost():
            InterruptedWhileFreed()  # freed at once
            time.sleep(2)  # raised again within 0.2 s
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
