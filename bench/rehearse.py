"""`make rehearse`: the paper's path rehearsed at reduced tokens on this machine. For each shape
of random-weight GPT-2 models built on the spot (the toy byte-level tokenizer) and each feed
(activation caches, or the models run without caches), under a CORR_MEMORY that forces at
least three passes:

1. an uninterrupted `analyze` (WORKERS=1) into one store: the reference results;
2. the same into a second store, killed (SIGKILL) once its first correlation block is on disk;
3. resumed there with WORKERS=2 and CORR_MEMORY unset, so another default budget (another
   share of the free memory) and another PARALLEL: it must adopt the recorded blocks.

It checks that no finished block was recomputed and that no other block was made (the block
files are counted and compared by inode and modification time), that every results CSV is
byte-identical to the reference's, and that each block's measured peak memory (run.json) is
within 15 % of its plan (above it: 15 % and the libraries' FIXED_ALLOWANCE). Prints a table;
exits 1 when a check fails.

    python -m bench.rehearse [small] [KEEP_FOLDER]
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from unlib.engine.memory import ModelFeed
from unlib.engine.planning import WorkPlan
from unlib.memory_check import Shape, build_models

REPO = Path(__file__).resolve().parent.parent
CSVS = ("excess_correlation_scores.csv", "pairwise_correlations.csv", "neuron_stats.csv", "universal_neurons.csv")
# (name, shape, tokens, feeds): two seeds of GPT-2 small's MLPs (12 x 3072, d_model 768) run
# without caches (the path a run takes when its caches do not fit the disk), and three seeds of
# a deep, narrow shape (24 x 512) with caches and without; 4096 tokens (two blocks of rows, the
# split halves) and one rotation. GPT-2 small's result step (12 x 12 products of 3072^3 per
# rotation and half) is most of its correlation at so few tokens: each of its runs takes some
# four minutes on 2 cores, so its cache feed (measured within 1 % of the plan at this width,
# docs/performance.md) is left out to keep the rehearsal within 15 minutes
FULL = (("GPT-2 small", Shape(2, 12, 3072, 768, 1024), 4096, ("models",)),
        ("deep", Shape(3, 24, 512, 256, 512), 4096, ("caches", "models")))
SMALL = (("small", Shape(3, 4, 1024, 256, 256), 4096, ("caches", "models")),)
ROTATIONS, TOLERANCE = 1, 0.15
# Besides a pass's working memory, which the plan counts, a process's first pass pays the
# libraries' one-time setup (the first GEMM's and HDF5's buffers, the model code's import) and
# each forward pass a fixed ~50 MiB of the model library's own: measured up to 170 MiB on this
# CPU, which matters against passes of a few hundred MiB only (CORR_MEMORY leaves it to the
# headroom outside the budget; unlib.memory_check measures after a warm-up, without it).
FIXED_ALLOWANCE = 192 * 2**20


@dataclasses.dataclass
class Row:
    name: str
    shape: Shape
    n_tokens: int
    feed: str
    passes: int
    planned: int  # the largest block's planned peak
    measured: int  # its measured peak
    ratios: list[float]  # every block's measured / planned peak
    blocks_before_kill: int
    blocks_reused: int
    seconds: float
    identical: bool
    problems: list[str]


def budget_for_passes(plan: WorkPlan, passes: int = 3) -> int:
    """The largest CORR_MEMORY (in MiB steps) whose plan has at least `passes` passes."""
    budget = plan.pass_bytes(plan.passes[0])
    while len(WorkPlan(plan.layer_sizes, plan.references, plan.n_rotations, plan.device, budget,
                       feed=plan.feed, n_tokens=plan.n_tokens).passes) < passes:
        budget = int(budget * 0.95)
    return budget // 2**20 * 2**20


def analyze(store: Path, models: list[Path], ctx_len: int, cache: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "UNLIB_STORE": str(store), "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": str(2**20)}  # the resident set follows the memory in use (unlib.memory_check)
    return subprocess.Popen(
        [sys.executable, "-m", "tasks", "analyze", "--models", ",".join(map(str, models)), "--dataset", "python-stdlib",
         "--ctx-len", str(ctx_len), "--exclude-tokens", "bos", "--rotations", str(ROTATIONS), "--device", "cpu",
         "--scheduler", "local", "--cache", cache, *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"analyze failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")


def blocks(store: Path) -> dict[Path, tuple[int, int]]:
    """The finished correlation blocks: path -> (inode, modification time)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.glob("correlation/*/blocks/ref-*.h5")}


def results_dir(store: Path) -> Path:
    (run,) = store.glob("results/*/*/run.json")
    return run.parent


def rehearse(name: str, shape: Shape, n_tokens: int, feed: str, root: Path) -> Row:
    start = time.perf_counter()
    models = build_models(shape, root / "models", tokenizer=True)
    from unlib.model_loading import model_footprint
    from unlib.model_sets import resolve_model_set

    specs = resolve_model_set(",".join(map(str, models))).models
    sizes = [[shape.d_mlp] * shape.n_layers] * shape.n_models
    ctx_len = min(512, shape.ctx_len)  # the paper's contexts
    plan_feed = None if feed == "caches" else ModelFeed(tuple(model_footprint(s, None) for s in specs), ctx_len)
    budget = budget_for_passes(WorkPlan(sizes, 0, ROTATIONS, "cpu", 2**50, feed=plan_feed, n_tokens=n_tokens))
    cache = "1" if feed == "caches" else "0"
    common = ("--n-tokens", str(n_tokens), "--batch-size", "8")
    reference, resumed = root / f"{feed}-reference", root / f"{feed}-resumed"
    finish(analyze(reference, models, ctx_len, cache, *common, "--workers", "1", "--corr-memory", str(budget)))
    proc = analyze(resumed, models, ctx_len, cache, *common, "--workers", "1", "--corr-memory", str(budget))
    while not blocks(resumed) and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = blocks(resumed)
    finish(analyze(resumed, models, ctx_len, cache, *common, "--workers", "2"))
    after = blocks(resumed)
    record = json.loads((results_dir(resumed) / "run.json").read_text())
    problems = []
    reused = sum(after.get(p) == stamp for p, stamp in before.items())
    if reused != len(before):
        problems.append(f"{len(before) - reused} finished block(s) recomputed")
    if len(after) != len(blocks(reference)):
        problems.append(f"{len(after)} blocks, the uninterrupted run made {len(blocks(reference))}")
    if not before or len(before) == len(after):
        problems.append("not killed in the middle of the correlation")
    identical = all((results_dir(reference) / n).read_bytes() == (results_dir(resumed) / n).read_bytes() for n in CSVS)
    if not identical:
        problems.append("results differ from the uninterrupted run's")
    passes = record["correlation_passes"]
    widest = max(passes, key=lambda p: p["planned_bytes"])
    for p in passes:
        planned = p["planned_bytes"]
        if not (1 - TOLERANCE) * planned <= p["peak_bytes"] <= (1 + TOLERANCE) * planned + FIXED_ALLOWANCE:
            problems.append(f"block {p['units']}: measured {p['peak_bytes'] / 2**20:,.0f} MiB, planned "
                            f"{p['planned_bytes'] / 2**20:,.0f} MiB")
    return Row(name, shape, n_tokens, feed, len(after), widest["planned_bytes"], widest["peak_bytes"],
               [round(p["peak_bytes"] / p["planned_bytes"], 3) for p in passes], len(before), reused,
               time.perf_counter() - start, identical, problems)


def main() -> int:
    args = sys.argv[1:]
    rehearsals = SMALL if args[:1] == ["small"] else FULL
    keep = next((Path(a) for a in args if a != "small"), None)
    root = keep or Path(tempfile.mkdtemp(prefix="rehearse-"))
    console = Console(width=160)  # the table whole in a log or a pipe, not wrapped to 80 columns
    rows = []
    try:
        for name, shape, n_tokens, feeds in rehearsals:
            for feed in feeds:
                with console.status(f"rehearse: {name}, {feed}"):
                    rows.append(rehearse(name, shape, n_tokens, feed, root / name.replace(" ", "-")))
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    table = Table(title=f"make rehearse ({ROTATIONS} rotations, contexts of up to 512 tokens, this machine's CPU)")
    for col in ("shape", "tokens", "feed", "passes", "largest block's peak planned / measured",
                "measured / planned, every block", "blocks done before kill / reused", "identical CSVs", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r.name}: {r.shape.label()}", f"{r.n_tokens:,}", r.feed, str(r.passes),
                      f"{r.planned / 2**20:,.0f} / {r.measured / 2**20:,.0f} MiB",
                      f"{min(r.ratios):.2f}-{max(r.ratios):.2f}", f"{r.blocks_before_kill} / {r.blocks_reused}",
                      "yes" if r.identical else "NO", f"{r.seconds:,.0f}")
    console.print(table, soft_wrap=True)
    console.print(f"make rehearse: {sum(r.seconds for r in rows) / 60:.1f} minutes in all")
    print(json.dumps([{**dataclasses.asdict(r), "shape": r.shape.label()} for r in rows]))
    failed = [f"{r.name} ({r.feed}): {p}" for r in rows for p in r.problems]
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
