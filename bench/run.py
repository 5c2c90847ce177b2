"""`make bench`: the correlation engine's speed and memory, as ratios measured in one run on
this machine: against its own fp32 matrix-multiply rate (reading real HDF5 activation
caches), against the paper's published algorithm (bench/reference.py) at R = 1 and R = 5
rotations for 2 and 5 models, across token counts and model counts, and projected to the
real job; and the analysis's wall time with two workers against one. Every timing is the
minimum over repetitions, so a busy machine does not distort the ratios. Writes
bench/results.json and prints a table."""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.reference import PAPER_BATCH_TOKENS, paper_max_correlations
from unlib.engine.engine import ExcessCorrelationEngine
from unlib.engine.layout import BYTES, HALVES
from unlib.engine.planning import WorkPlan
from unlib.engine.precision import DOCUMENTED_ERROR, ERROR_BOUND, default_precision, runnable_precisions
from unlib.engine.comoments import stream
from unlib.engine.results import PassStats, combine
from unlib.engine.rotations import gaussian, haar_orthogonal
from unlib.memory_check import Shape, build_models
from unlib.plan import best_seconds, matmul_rate

OUT = Path(__file__).resolve().parent / "results.json"
CHUNK = 4096


def synthetic(layer_sizes: list[list[int]], n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """Per model (tokens, neurons) activations with shared structure (a common latent plus
    noise), ReLU-sparse."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(n_tokens, 32, generator=gen)
    return [torch.relu(latent @ torch.randn(32, sum(sizes), generator=gen)
                       + torch.randn(n_tokens, sum(sizes), generator=gen)) for sizes in layer_sizes]


def source(data: list[torch.Tensor], chunk: int = CHUNK):
    """In-memory activations as an engine feed: views, no copies."""
    def chunks(needed=None):
        for start in range(0, data[0].shape[0], chunk):
            yield [a[start:start + chunk] for a in data]
    return chunks


def generated_source(layer_sizes: list[list[int]], n_tokens: int, chunk: int = CHUNK):
    """Chunks generated on the fly, so nothing in the source grows with the token count."""
    def chunks(needed=None):  # noqa: ARG001
        for start in range(0, n_tokens, chunk):
            yield synthetic(layer_sizes, min(chunk, n_tokens - start), seed=start)
    return chunks


def best_of(repeats: int, fn):
    """(the minimum wall time over `repeats` calls of fn, the last call's result): a busy
    machine slows some repetitions, never speeds one up."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def time_engine(layer_sizes, chunks, references, rotations: int = 5, memory: int | None = None,
                chunk_tokens: int = CHUNK, repeats: int = 1) -> tuple[float, ExcessCorrelationEngine, PassStats, dict]:
    """(min seconds over `repeats` runs, the last run's engine, what its passes cost, its results)."""
    def run():
        engine = ExcessCorrelationEngine(layer_sizes, references, rotations, 0, "cpu", memory, chunk_tokens)
        passes = [engine.run_pass(chunks, units) for units in engine.passes]
        return engine, PassStats.total(p.stats for p in passes), combine(passes, layer_sizes, engine.references)
    seconds, (engine, stats, results) = best_of(repeats, run)
    return seconds, engine, stats, results


def write_caches(root: Path, n_models: int, n_layers: int, d_mlp: int, n_tokens: int) -> list:
    """HDF5 activation caches written by unlib.activations.cache_activations, as the
    pipeline writes them, from small random-initialised GPT-2 models (d_model 128) run over
    the same random tokens (sequences of 256 analysed tokens after BOS)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from unlib.activations import ActivationCache, cache_activations
    from unlib.exclusion import kept_positions
    from unlib.model_loading import load_model
    from unlib.model_sets import ModelSpec
    from unlib.zoo import quiet_transformers

    quiet_transformers()
    ctx = 257
    gen = np.random.default_rng(0)
    tokens = gen.integers(1, 257, size=(n_tokens // (ctx - 1), ctx)).astype(np.int32)
    tokens[:, 0] = 0
    caches = []
    for seed in range(n_models):
        torch.manual_seed(seed)
        folder = root / f"m{seed}"
        GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=128, n_head=4, n_inner=d_mlp, n_positions=ctx,
                                   vocab_size=257)).save_pretrained(folder)
        _tokenizer_stub(str(folder))
        model = load_model(ModelSpec(f"m{seed}", str(folder)), None)
        cache_activations(model, tokens, kept_positions(tokens, []), root / f"m{seed}.h5", {"model": f"m{seed}"})
        caches.append(ActivationCache(root / f"m{seed}.h5"))
        del model
    return caches


def engine_vs_machine(repeats: int = 2) -> dict:
    """The engine reading real HDF5 activation caches (4 random GPT-2-shaped models of
    4 x 512 neurons, REFERENCE=all, R=5, rotations included), against this machine's fp32
    matmul rate in the engine's GEMM shapes, sustained over 10 s and measured before and after
    the engine's runs (the faster reading counts); also from memory. The engine's work is its
    GEMMs, the stream's co-moments and the result step's rotated baselines; the Haar draws
    (Gaussians and QRs), the feed and every other step count against it."""
    from unlib.activations import cached_chunks

    n_models, n_layers, d = 4, 4, 512
    sizes = [[d] * n_layers] * n_models
    n = 32 * CHUNK
    width = n_layers * d
    rates = lambda: (matmul_rate(CHUNK, width, width, seconds=10), matmul_rate(CHUNK, d, d, seconds=10))  # noqa: E731
    before = rates()
    with tempfile.TemporaryDirectory() as tmp:
        caches = write_caches(Path(tmp), n_models, n_layers, d, n)
        fed = lambda needed: cached_chunks(caches, CHUNK, "cpu", needed)  # noqa: E731
        seconds, engine, stats, _ = time_engine(sizes, fed, list(range(n_models)), repeats=repeats)
        data = [torch.from_numpy(np.concatenate([c.read(l) for l in range(n_layers)], axis=1)) for c in caches]
    memory_seconds, _, _, _ = time_engine(sizes, source(data), list(range(n_models)), repeats=repeats)
    wide_rate, narrow_rate = map(max, zip(before, rates()))
    within_flops = 2.0 * n * n_models * n_layers * d * d
    cross_flops = stats.flops - within_flops
    reduce_flops = sum(engine.reduce_flops(units) for units in engine.passes)
    ideal = cross_flops / wide_rate + (within_flops + reduce_flops) / narrow_rate
    work = stats.flops + reduce_flops
    return {"shape": f"{n_models} models x {n_layers} layers x {d} neurons, {n} tokens, REFERENCE=all, R=5 "
                     "(rotations included), read from HDF5 activation caches",
            "engine_gflops": work / seconds / 1e9, "machine_gflops": work / ideal / 1e9,
            "stream_flops": stats.flops, "reduce_flops": reduce_flops,
            "ratio": ideal / seconds, "engine_s": seconds, "engine_from_memory_s": memory_seconds,
            "ratio_from_memory": ideal / memory_seconds, "feed_share": 1 - memory_seconds / seconds,
            "stream_s": stats.stream_seconds, "reduce_s": stats.reduce_seconds, "qr_s": stats.rotation_seconds,
            "repeats": repeats, "goal": ">= 0.85 (HDF5 feed included)"}


def engine_vs_paper(n_models: int, rotations: int, repeats: int = 3) -> dict:
    """The engine against the paper's algorithm (bench/reference.py) on the paper's job: one
    reference model against each of the others, R rotation samples; both read the same
    activations from memory. Also the largest difference of their max correlations."""
    n_layers, d = 4, 256
    sizes = [[d] * n_layers] * n_models
    n = 16 * CHUNK
    data = synthetic(sizes, n, seed=n_models)
    seconds, engine, _, results = time_engine(sizes, source(data), [0], rotations=rotations, repeats=repeats)
    qs = [{(m, l): engine.rotation(m, l, r) for m in range(1, n_models) for l in range(n_layers)}
          for r in range(rotations)]
    batches = source(data, PAPER_BATCH_TOKENS)
    paper_seconds, paper = best_of(repeats, lambda: paper_max_correlations(batches, sizes, qs, reference=0))
    worst_max = worst_base = 0.0
    for other, (plain, rotated) in paper.items():
        k = results[0][0].others.index(other)
        got = np.concatenate([r.max_corr[k] for r in results[0]])
        worst_max = max(worst_max, float(np.abs(plain.numpy() - got).max()))
        for s, values in enumerate(rotated):
            got = np.concatenate([r.baseline_max_corr[k, s] for r in results[0]])
            worst_base = max(worst_base, float(np.abs(values.numpy() - got).max()))
    return {"models": n_models, "rotations": rotations,
            "shape": f"{n_models} models x {n_layers} layers x {d} neurons, {n} tokens, REFERENCE=0, R={rotations}",
            "engine_s": seconds, "paper_s": paper_seconds, "speedup": paper_seconds / seconds,
            "max_abs_diff_max_corr": worst_max, "max_abs_diff_baseline": worst_base, "repeats": repeats,
            "goal": ">= 1.3x" if rotations == 1 else ">= 4x" if rotations == 5 else ""}


def toy_zoo_caches() -> list:
    """The toy zoo's step-1000 activation caches of the default analysis (100,000 tokens), made by
    `make analyze CHECKPOINT=1000` first where the store lacks them (the zoo trained once)."""
    from unlib.activations import ActivationCache
    from unlib.store import Store

    pattern = "activations/toy-zoo-*--seed-*/checkpoint-1000/*_n100000_*.h5"
    if len(sorted(Store().root.glob(pattern))) < 5:
        subprocess.run([sys.executable, "-m", "tasks", "analyze", "--checkpoint", "1000"], check=True,
                       capture_output=True, cwd=Path(__file__).resolve().parent.parent)
    return [ActivationCache(p) for p in sorted(Store().root.glob(pattern))[:5]]


def float64_correlations(data: list[torch.Tensor], engine: ExcessCorrelationEngine) -> tuple[np.ndarray, np.ndarray]:
    """The reference's (model 0's) max correlations against each other model, and its max
    correlations against their layers rotated by the engine's own rotations, in float64 on
    the data's device: (others, neurons) and (others, rotations, neurons); NaN for a
    reference neuron constant over the tokens."""
    x = [d.double() - d.double().mean(0) for d in data]
    norm = [c.norm(dim=0) for c in x]
    scale = [torch.where(n > 0, 1 / n, torch.zeros_like(n)) for n in norm]
    maxes, baselines = [], []
    for m in range(1, len(data)):
        cross = (x[0].T @ x[m]) * scale[0][:, None]
        maxes.append((cross * scale[m]).amax(1))
        samples = []
        for r in range(engine.n_rotations):
            parts = []
            for k, d in enumerate(engine.layer_sizes[m]):
                cols = slice(k * d, (k + 1) * d)
                q = engine.rotation(m, k, r).to(x[m].device, torch.float64)
                rotated = (x[m][:, cols] @ q).norm(dim=0)
                parts.append(cross[:, cols] @ q * torch.where(rotated > 0, 1 / rotated, torch.zeros_like(rotated)))
            samples.append(torch.cat(parts, 1).amax(1))
        baselines.append(torch.stack(samples))
    dead = (norm[0] == 0).cpu().numpy()
    maxes, baselines = torch.stack(maxes).cpu().numpy(), torch.stack(baselines).cpu().numpy()
    maxes[:, dead], baselines[:, :, dead] = np.nan, np.nan
    return maxes, baselines


def precision_errors(data: list[torch.Tensor], sizes: list[list[int]], threshold: float, device: str,
                     rotations: int = 5) -> dict:
    """Per PRECISION mode, the engine (REFERENCE=0, from memory) against float64 on `data`: the
    largest |difference| of a max correlation and of a rotated-baseline max correlation, and
    how many neurons enter or leave the universal set (excess >= threshold)."""
    truth_max, truth_base = float64_correlations(data, ExcessCorrelationEngine(sizes, [0], rotations, 0, device))
    live = ~np.isnan(truth_max[0])
    truth_set = set(np.flatnonzero(live & ((truth_max - truth_base.mean(1)).mean(0) >= threshold)))
    out = {}
    for mode in runnable_precisions(device):
        engine = ExcessCorrelationEngine(sizes, [0], rotations, 0, device, precision=mode)
        layers = engine.run(source(data))[0]
        got_max = np.concatenate([r.max_corr for r in layers], axis=1)
        got_base = np.concatenate([r.baseline_max_corr for r in layers], axis=2)
        got_set = set(np.flatnonzero(live & ((got_max - got_base.mean(1)).mean(0) >= threshold)))
        out[mode] = {"max_corr_error": float(np.abs(got_max - truth_max)[:, live].max()),
                     "baseline_error": float(np.abs(got_base - truth_base)[:, :, live].max()),
                     "universal_changed": len(got_set ^ truth_set), "universal": len(truth_set)}
    return out


def precision_rates(device: str, sizes: list[list[int]], n_tokens: int, seconds: float = 3.0) -> dict:
    """Per PRECISION mode: the machine's matmul rate in the stream's GEMM shape, and the engine's
    stream (REFERENCE=all, R=5, from memory) on `sizes`: its rate, its share of that mode's
    matmul rate, its speedup over fp32, and the share of the correlation's time spent drawing
    rotations."""
    data = [a.to(device) for a in synthetic(sizes, n_tokens)]
    d, width = max(max(s) for s in sizes), max(sum(s) for s in sizes)
    out = {}
    for mode in runnable_precisions(device):
        rate = matmul_rate(2048, d, width, device, seconds, precision=mode)
        engine = ExcessCorrelationEngine(sizes, list(range(len(sizes))), 5, 0, device, precision=mode)
        start = time.perf_counter()
        passes = [engine.run_pass(source(data), units) for units in engine.passes]
        total = time.perf_counter() - start
        stats = PassStats.total(p.stats for p in passes)
        out[mode] = {"matmul_gflops": rate / 1e9, "stream_gflops": stats.flops / stats.stream_seconds / 1e9,
                     "stream_over_matmul": stats.flops / stats.stream_seconds / rate,
                     "stream_s": stats.stream_seconds, "total_s": total,
                     "rotation_share": stats.rotation_seconds / total,
                     "rotations_drawn": sum(len(engine.rotation_sizes(u)) for u in engine.passes)}
    for mode in out:
        out[mode]["stream_speedup"] = out["fp32"]["stream_s"] / out[mode]["stream_s"]
    return out


def rotation_draws(device: str, n: int = 3072, repeats: int = 2) -> dict:
    """One Haar draw of an n x n rotation on `device` (GPT-2-small's width by default): the
    seconds of its Gaussian and of its QR (QR_DTYPE) (the least over `repeats`), and how far Q is
    from orthogonal (max |Q^T Q - I|, in float64)."""
    where = torch.device(device)
    gaussian_s = best_seconds(lambda: gaussian(n, [0, 1, 2, 3], where), where, repeats)
    qr_s = best_seconds(lambda: haar_orthogonal(n, [0, 1, 2, 3], where), where, repeats)
    q = haar_orthogonal(n, [0, 1, 2, 3], where).double()
    eye = torch.eye(n, dtype=torch.float64, device=q.device)
    return {"n": n, "gaussian_s": gaussian_s, "qr_s": qr_s - gaussian_s, "draw_s": qr_s,
            "orthogonality": float((q.T @ q - eye).abs().max())}


# the products' ops on a CPU, their kernels on a GPU (cuBLAS names Hopper's GEMM kernels nvjet_*)
PRODUCT_OPS = re.compile(r"gemm|xmma|cutlass|nvjet|addmm|aten::mm$|matmul", re.IGNORECASE)


def stream_profile(device: str, sizes: list[list[int]], n_tokens: int, precision: str, table_path: Path) -> dict:
    """One pass's stream (REFERENCE=all, R=5, from memory, after a warm-up pass) under
    torch.profiler: how busy the device was over the stream's wall time (kernels on a GPU,
    the calling thread's ops on a CPU), the products' share of that busy time, and the ops
    that took longest; the profiler's whole table is written to `table_path`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.startswith("cuda")
    data = [a.to(device) for a in synthetic(sizes, n_tokens)]
    engine = ExcessCorrelationEngine(sizes, list(range(len(sizes))), 5, 0, device, precision=precision)
    units = engine.passes[0]
    engine.run_pass(source(data), units)  # allocations, kernel choice
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        start = time.perf_counter()
        stream(engine.layout, source(data), units, engine.products, PassStats())
        if on_gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    # each kernel's time once: on a GPU the kernels' own events (an op's event repeats its kernels'
    # time), on a CPU the ops
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    kind = DeviceType.CUDA if on_gpu else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind and getattr(e, key) > 0
              and (on_gpu or e.key.startswith("aten::"))]
    busy = sum(getattr(e, key) for e in events) / 1e6
    products = sum(getattr(e, key) for e in events if PRODUCT_OPS.search(e.key)) / 1e6
    table_path.write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
    top = sorted(events, key=lambda e: -getattr(e, key))[:5]
    return {"wall_s": wall, "busy_share": busy / wall, "products_share": products / busy if busy else 0.0,
            "top": [[e.key[:60], getattr(e, key) / 1e6, e.count] for e in top], "table": str(table_path)}


def fastest_within_bound(errors: dict, rates: dict) -> str:
    """The default the measurements choose: the fastest stream among the modes whose errors are
    below ERROR_BOUND."""
    fine = [m for m in errors if max(errors[m]["max_corr_error"], errors[m]["baseline_error"]) < ERROR_BOUND]
    return max(fine, key=lambda m: rates[m]["stream_gflops"], default="fp32")


def precision_modes() -> dict:
    """The precision table on this CPU: errors on the toy zoo's step-1000 caches (5 models x
    2 x 256 neurons, 100,000 tokens, R=5) against float64, rates on the engine_vs_machine
    shape (4 models x 4 x 512, 32k tokens), and the default the measurements choose against
    the one the code holds (unlib.engine.precision.default_precision)."""
    from unlib.model_sets import ZOO_DEFAULTS

    caches = toy_zoo_caches()
    data = [torch.from_numpy(np.concatenate([c.read(l) for l in range(len(c.layers))], axis=1)) for c in caches]
    sizes = [[int(d.shape[1]) // len(c.layers)] * len(c.layers) for c, d in zip(caches, data)]
    errors = precision_errors(data, sizes, ZOO_DEFAULTS["toy-zoo"].threshold, "cpu")
    del data
    rates = precision_rates("cpu", [[512] * 4] * 4, 8 * CHUNK)
    chosen = fastest_within_bound(errors, rates)
    return {"errors": errors, "rates": rates, "measured_default": chosen, "code_default": default_precision("cpu"),
            "error_bound": ERROR_BOUND, "rotation_draw": rotation_draws("cpu")}


# The paper's three runs (docs/paper-runs.md): models x layers x neurons, REFERENCE=0, R=5
PAPER_RUNS = {"stanford-gpt2-small": [[3072] * 12] * 5, "stanford-gpt2-medium": [[4096] * 24] * 5,
              "pythia-160m": [[3072] * 12] * 4}


def device_section(device: str = "cuda", rate_sizes: list[list[int]] | None = None, rate_tokens: int = 4 * CHUNK,
                   error_tokens: int = 8 * CHUNK, seconds: float = 3.0,
                   pipeline_shape: Shape = Shape(5, 12, 3072, 768, 1024), pipeline_tokens: int = 4 * CHUNK,
                   profile_path: Path = OUT.with_name("profile-cuda.txt")) -> dict:
    """`make bench DEVICE=cuda`: the precision table on the GPU (errors against float64 on
    synthetic activations of the toy zoo's shape, on the device), the stream's rate per mode
    on GPT-2-small shapes (default 2 models x 12 x 3072, REFERENCE=all) against the card's
    matmul rate in that mode, the share of the correlation's time spent drawing rotations, one
    Haar draw at the stream's width, a profile of the stream in the measured default
    (`profile_path` gets the profiler's table), the correlation's projected wall time for the paper's
    three runs at 10M and 100M tokens in the measured default (forward passes not included),
    and an end-to-end analysis of five GPT-2-small-shaped random-weight models (16,384 tokens:
    their activation caches take 11 GiB). Smaller shapes run it on a CPU (tests)."""
    rate_sizes = rate_sizes or [[3072] * 12] * 2
    sizes = [[256, 256]] * 5
    errors = precision_errors([a.to(device) for a in synthetic(sizes, error_tokens)], sizes, 0.3, device)
    rates = precision_rates(device, rate_sizes, rate_tokens, seconds)
    chosen = fastest_within_bound(errors, rates)
    rate = rates[chosen]["stream_gflops"] * 1e9
    draw = rotation_draws(device, max(rate_sizes[0]))
    projected = {}
    for name, run_sizes in PAPER_RUNS.items():
        plan = WorkPlan(run_sizes, 0, 5, "cpu", 64 * 2**30, precision=chosen)  # planning touches no device
        # a draw is mostly its QR (n^3); its Gaussian (n^2) is the smaller part
        draw_s = sum(draw["draw_s"] * (n / draw["n"]) ** 3 for u in plan.passes for n in plan.rotation_sizes(u))
        projected[name] = {f"{n // 10**6}M_tokens_hours": (sum(plan.stream_flops(u, n) for u in plan.passes) / rate
                                                           + draw_s) / 3600 for n in (10**7, 10**8)}
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or device
    return {"device": name, "errors": errors, "rates": rates, "measured_default": chosen,
            "code_default": default_precision(device), "rotation_draw": draw, "projected_correlation": projected,
            "profile": stream_profile(device, rate_sizes, rate_tokens, chosen, profile_path),
            "pipeline": pipeline_stages(device, pipeline_shape, pipeline_tokens)}


STAGES = """
import json, sys
from tasks.activations import CacheActivations
from tasks.analysis import NeuronStats
from tasks.api import build_analyses, graph_tasks, quiet_run, run_graph
from tasks.correlation import Correlations
from tasks.data import TokenizeDataset
from unlib.config import RunConfig
device, n_tokens, ctx_len, *models = sys.argv[1:]
config = RunConfig(models=",".join(models), dataset="python-stdlib", n_tokens=int(n_tokens), ctx_len=int(ctx_len),
                   exclude_tokens="bos", device=device, cache="1", workers=1)
seconds = {}
with quiet_run():
    roots = build_analyses(config)
    seconds["tokenize"] = run_graph(graph_tasks(roots, TokenizeDataset), 1).seconds
    for correlation in graph_tasks(roots, Correlations):
        correlation.record_plan()
    for stage, kind in (("forward", CacheActivations), ("correlation", Correlations), ("statistics", NeuronStats)):
        seconds[stage] = run_graph(graph_tasks(roots, kind), 1).seconds
    seconds["rest"] = run_graph(roots, 1).seconds
print(json.dumps({"seconds": seconds, "run": json.loads(open(roots[0].output()["run"].path).read())}))
"""


def pipeline_stages(device: str, shape: Shape, n_tokens: int) -> dict:
    """`make analyze` on random-weight GPT-2 models of `shape` built on the spot (the toy
    zoo's byte-level tokenizer, python-stdlib, caches written), one stage at a time in a fresh
    store and process: the seconds of each stage and the tokens per second of the forward
    passes (all models, activations cached), the correlation and the neuron statistics."""
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(shape, Path(tmp) / "models", tokenizer=True)
        if device.startswith("cuda"):  # this process's cached blocks would shrink the run's CORR_MEMORY
            torch.cuda.empty_cache()
        out = subprocess.run([sys.executable, "-c", STAGES, device, str(n_tokens), str(min(512, shape.ctx_len)),
                              *map(str, models)], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "UNLIB_STORE": str(Path(tmp) / "store")})
    if out.returncode != 0:
        raise RuntimeError(f"make analyze on {shape.label()} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    seconds, run = result["seconds"], result["run"]
    return {"shape": shape.label(), "n_tokens": n_tokens, "seconds": seconds,
            "forward_tokens_per_s": n_tokens * shape.n_models / seconds["forward"],
            "correlation_tokens_per_s": n_tokens / seconds["correlation"],
            "statistics_tokens_per_s": n_tokens / seconds["statistics"],
            "precision": run["precision"], "rotation_share": run["rotation_share"], "universal": run["n_universal"]}


PROBE = """
import sys
import bench.run as b
from unlib.engine.engine import ExcessCorrelationEngine
from unlib.memory_check import fixed_mmap_threshold, peak_memory
fixed_mmap_threshold()
n_tokens, budget, chunk = map(int, sys.argv[1:])
sizes = [[512, 512]] * 5
source = b.generated_source(sizes, n_tokens, chunk)
engine = ExcessCorrelationEngine(sizes, list(range(5)), 5, 0, "cpu", budget, chunk)
print(peak_memory(lambda: engine.run(source), "cpu")[1], len(engine.passes))
"""


def peak_memory(n_tokens: int, budget: int, chunk: int) -> dict:
    """Peak RSS growth of the engine over n_tokens (REFERENCE=all, 5 models), measured in a
    fresh process."""
    out = subprocess.run([sys.executable, "-c", PROBE, str(n_tokens), str(budget), str(chunk)],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()
    return {"tokens": n_tokens, "peak_bytes": int(out[0]), "passes": int(out[1])}


def plan_vs_measured() -> list[dict]:
    """One correlation pass's measured peak against its memory plan, from activation caches
    and from the models (no cache), on three shapes of random-weight GPT-2 models at GPT-2
    widths (unlib.memory_check, in a fresh process)."""
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run([sys.executable, "-m", "unlib.memory_check", folder, "large"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory() -> dict:
    budget, chunk = 144 * 2**20, 1024  # 10 passes of two units (both halves of a layer against a model)
    small, large = peak_memory(16 * chunk, budget, chunk), peak_memory(64 * chunk, budget, chunk)
    return {"budget_bytes": budget, "at_N": small, "at_4N": large,
            "ratio_4N_over_N": large["peak_bytes"] / small["peak_bytes"],
            "peak_over_budget": large["peak_bytes"] / budget, "goal": "ratio <= 1.1, peak within budget"}


def scaling() -> dict:
    """Time at N and 2N tokens, and at 2 and 4 models (REFERENCE=all): the work grows as
    pairs M(M-1)/2 plus M within-layer co-moments, so the expected model ratio is the FLOP ratio."""
    sizes = [[512, 512]] * 4
    n = 16 * CHUNK
    t1, _, e4, _ = time_engine(sizes, source(synthetic(sizes, n)), [0, 1, 2, 3], repeats=2)
    t2, _, _, _ = time_engine(sizes, source(synthetic(sizes, 2 * n)), [0, 1, 2, 3], repeats=2)
    m2, _, e2, _ = time_engine([[512, 512]] * 2, source(synthetic([[512, 512]] * 2, n)), [0, 1], repeats=2)
    return {"tokens": n, "tokens_N_s": t1, "tokens_2N_s": t2, "ratio_2N_over_N": t2 / t1, "goal": "1.8-2.2",
            "models_2_s": m2, "models_4_s": t1, "ratio_4_over_2_models": t1 / m2,
            "expected_4_over_2_models": e4.flops / e2.flops,
            "fixed_seconds_at_4_models": e4.reduce_seconds}


def projection() -> dict:
    """GPT-2-small shapes (12 x 3072) from random-initialised models built from a config:
    forward tokens/s and engine GFLOP/s measured here, extrapolated to 5 models x 1M tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from unlib.mlp_hooks import mlp_activations
    from unlib.model_loading import load_model
    from unlib.model_sets import ModelSpec
    from unlib.zoo import quiet_transformers

    quiet_transformers()
    n_tokens, ctx = 1024, 257
    tokens = torch.randint(1, 50000, (n_tokens // (ctx - 1), ctx))
    acts, fwd_seconds = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(2):
            torch.manual_seed(seed)
            GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp + f"/m{seed}")
            _tokenizer_stub(tmp + f"/m{seed}")
            model = load_model(ModelSpec(f"m{seed}", tmp + f"/m{seed}"), None)
            start = time.perf_counter()
            acts.append(mlp_activations(model, tokens))
            fwd_seconds += time.perf_counter() - start
            del model
    sizes = [[3072] * 2, [3072] * 12]  # two reference layers against a whole model
    data = [torch.cat(acts[0][:2], dim=1), torch.cat(acts[1], dim=1)]
    _, _, stats, _ = time_engine(sizes, source(data, n_tokens), [0], rotations=5, chunk_tokens=n_tokens)
    rate = stats.flops / stats.stream_seconds
    d = 12 * 3072
    # Streamed work of the real job: 10 model pairs plus 5 x 12 within-layer co-moments.
    job_flops = 10 * 2.0 * d * d * 1e6 + 5 * 12 * 2.0 * 3072 ** 2 * 1e6
    # Fixed work after the stream, scaled from the measured reduce step (2 reference layers
    # against 12 rotated layers, R=5): the real job draws 5 x 12 x 5 rotations instead of
    # 12 x 5, and multiplies 20 directions x 36864 rows instead of 6144 by them.
    gemm_seconds = stats.reduce_seconds - stats.rotation_seconds
    fixed_seconds = stats.rotation_seconds * 5 + gemm_seconds * 20 * d / (2 * 3072)
    forward_tps = 2 * n_tokens / fwd_seconds
    ram_budget = 12 * 2**30
    # 10 pair accumulators of d x d float32, each held for both halves of the tokens
    passes = int(np.ceil(HALVES * 10 * d * d * BYTES / ram_budget))
    engine_hours = (job_flops / rate + fixed_seconds) / 3600
    forward_hours = passes * 5 * 1e6 / forward_tps / 3600
    return {"engine_stream_gflops": rate / 1e9, "measured_reduce_seconds": stats.reduce_seconds,
            "measured_rotation_seconds": stats.rotation_seconds,
            "projected_fixed_hours": fixed_seconds / 3600, "forward_tokens_per_s_per_model": forward_tps,
            "job_flops": job_flops, "passes_with_12GiB": passes,
            "projected_engine_hours": engine_hours, "projected_forward_hours_cache0": forward_hours,
            "projected_total_hours_cache0": engine_hours + forward_hours,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device in this run"}


def _tokenizer_stub(path: str) -> None:
    """GPT-2's tokenizer cannot be downloaded here; the bridge only needs some tokenizer."""
    from unlib.zoo import train_tokenizer

    train_tokenizer(["a b c"], 257, 100, path)


WORKERS_ARGS = ["--models", "toy-zoo-mini", "--checkpoint", "300", "--reference", "all", "--device", "cpu",
                "--scheduler", "local"]


def workers() -> dict:
    """Wall time of one small analysis (toy-zoo-mini, 8192 tokens, REFERENCE=all: three
    caches and three references' statistics, plots and reports that can run in parallel)
    with WORKERS=1 and WORKERS=2, each on a store holding only the trained zoo (trained
    first by a smaller run, not timed)."""
    repo = Path(__file__).resolve().parent.parent

    def run(store: Path, *args: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tasks", "analyze", *WORKERS_ARGS, *args], cwd=repo, check=True,
                       env={**os.environ, "UNLIB_STORE": str(store)}, capture_output=True)
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        trained = Path(tmp) / "trained"
        train_seconds = run(trained, "--n-tokens", "4096", "--reference", "0", "--workers", "2")
        seconds = {}
        for n in (1, 2):
            store = Path(tmp) / f"workers-{n}"
            shutil.copytree(trained / "zoo", store / "zoo")
            seconds[n] = run(store, "--n-tokens", "8192", "--workers", str(n))
    return {"shape": "toy-zoo-mini, 8192 tokens, REFERENCE=all, from a trained zoo", "cores": os.cpu_count(),
            "training_run_s": train_seconds, "workers_1_s": seconds[1], "workers_2_s": seconds[2], "ratio_2_over_1": seconds[2] / seconds[1],
            "goal": "<= 1 (more workers never slower)"}


def precision_rows(table: Table, section: dict, where: str) -> None:
    """The precision table's rows: per mode its errors against float64, the change in the
    universal set, its rates and its speedup over fp32; then the default it chooses."""
    for mode in section["errors"]:
        e, r = section["errors"][mode], section["rates"][mode]
        table.add_row(f"{where} PRECISION={mode}: max |diff| from float64 (max_corr, baseline); universal set changed",
                      f"{e['max_corr_error']:.1e}, {e['baseline_error']:.1e}; {e['universal_changed']} of "
                      f"{e['universal']}", f"<= {DOCUMENTED_ERROR[mode]:.0e} (documented)")
        table.add_row(f"{where} PRECISION={mode}: stream / matmul rate; speedup over fp32; rotation share",
                      f"{r['stream_over_matmul']:.2f} ({r['stream_gflops']:,.0f} / {r['matmul_gflops']:,.0f} GFLOP/s); "
                      f"{r['stream_speedup']:.2f}x; {r['rotation_share']:.0%}",
                      ">= 0.9 (fp32, CPU)" if mode == "fp32" and where == "cpu" else "")
    table.add_row(f"{where} default PRECISION: fastest within {ERROR_BOUND:g} of float64",
                  f"measured {section['measured_default']}, code {section['code_default']}", "the same")
    d = section["rotation_draw"]
    table.add_row(f"{where} Haar draw of {d['n']} x {d['n']}: Gaussian + QR; max |Q^T Q - I|",
                  f"{d['gaussian_s']:.3f} s + {d['qr_s']:.3f} s; {d['orthogonality']:.1e}", "orthogonal to 1e-5")


def cuda_main(console: Console) -> int:
    """`make bench DEVICE=cuda`: only the GPU section."""
    if not torch.cuda.is_available():
        console.print("error: DEVICE=cuda but no CUDA GPU is available here; run make bench on the GPU host")
        return 2
    start = time.perf_counter()
    section = device_section()
    out = OUT.with_name("results-cuda.json")
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, **section}, indent=2)
                   + "\n")
    table = Table(title=f"make bench DEVICE=cuda ({section['device']}, {time.strftime('%Y-%m-%d')})")
    for col in ("measure", "value", "goal"):
        table.add_column(col)
    precision_rows(table, section, "cuda")
    for name, hours in section["projected_correlation"].items():
        table.add_row(f"projected correlation, {name}", ", ".join(f"{k.split('_')[0]} tokens {v:.2f} h"
                                                                  for k, v in hours.items()), "")
    p = section["profile"]
    table.add_row(f"stream profile ({section['measured_default']}): device busy; products' share of it",
                  f"{p['busy_share']:.0%} of {p['wall_s']:.2f} s; {p['products_share']:.0%} (table: {p['table']})",
                  "products >= 0.9 of a busy device")
    table.add_row("stream profile: longest ops", "; ".join(f"{name} {sec:.3f} s x{n}" for name, sec, n in p["top"]), "")
    p = section["pipeline"]
    table.add_row(f"make analyze, {p['shape']}, {p['n_tokens']:,} tokens: seconds per stage",
                  ", ".join(f"{k} {v:.1f}" for k, v in p["seconds"].items()), "")
    table.add_row("tokens/s: forward passes (all models), correlation, statistics",
                  f"{p['forward_tokens_per_s']:,.0f}, {p['correlation_tokens_per_s']:,.0f}, "
                  f"{p['statistics_tokens_per_s']:,.0f} (rotation share {p['rotation_share']:.0%})", "")
    console.print(table)
    console.print(f"Wrote {out} ({time.perf_counter() - start:.0f} s)")
    return 0


def main() -> int:
    console = Console()
    torch.manual_seed(0)
    if os.environ.get("DEVICE", "").lower().startswith("cuda"):
        return cuda_main(console)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} torch threads", "torch": torch.__version__}
    paper = [(m, r) for m in (2, 5) for r in (1, 5)]
    steps = [("precision", precision_modes), ("engine_vs_machine", engine_vs_machine),
             *[(f"vs_paper_{m}_models_R{r}", lambda m=m, r=r: engine_vs_paper(m, r)) for m, r in paper],
             ("memory", memory), ("plan_vs_measured", plan_vs_measured),
             ("scaling", scaling), ("projection", projection), ("workers", workers)]
    results["step_seconds"] = {}
    for name, step in steps:
        with console.status(f"bench: {name}"):
            start = time.perf_counter()
            results[name] = step()
            results["step_seconds"][name] = round(time.perf_counter() - start, 1)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    table = Table(title=f"make bench ({results['machine']}, {results['date']})")
    for col in ("measure", "value", "goal"):
        table.add_column(col)
    r = results
    precision_rows(table, r["precision"], "cpu")
    e = r["engine_vs_machine"]
    table.add_row("engine (HDF5 feed) / machine fp32 matmul rate", f"{e['ratio']:.2f} ({e['engine_gflops']:.0f} / "
                  f"{e['machine_gflops']:.0f} GFLOP/s; from memory {e['ratio_from_memory']:.2f})", e["goal"])
    for m, rot in paper:
        v = r[f"vs_paper_{m}_models_R{rot}"]
        table.add_row(f"speedup vs the paper's algorithm, {m} models, R={rot}",
                      f"{v['speedup']:.2f}x ({v['paper_s']:.2f} s / {v['engine_s']:.2f} s; max |diff| "
                      f"{max(v['max_abs_diff_max_corr'], v['max_abs_diff_baseline']):.1e})", v["goal"])
    m = r["memory"]
    table.add_row("peak memory 4N / N", f"{m['ratio_4N_over_N']:.2f} ({m['at_N']['peak_bytes'] / 2**20:.0f} -> "
                  f"{m['at_4N']['peak_bytes'] / 2**20:.0f} MiB)", "<= 1.1")
    table.add_row("peak memory / CORR_MEMORY", f"{m['peak_over_budget']:.2f} ({m['at_4N']['passes']} passes)", "<= 1")
    for v in r["plan_vs_measured"]:
        table.add_row(f"measured / planned peak, {v['shape']}, {v['feed']}",
                      f"{v['measured'] / v['planned']:.2f} ({v['measured'] / 2**20:,.0f} / {v['planned'] / 2**20:,.0f} MiB)",
                      "0.85-1.15")
    s = r["scaling"]
    table.add_row("time 2N / N", f"{s['ratio_2N_over_N']:.2f}", "1.8-2.2")
    table.add_row("time 4 models / 2 models", f"{s['ratio_4_over_2_models']:.2f}",
                  f"~{s['expected_4_over_2_models']:.2f} (FLOP ratio)")
    p = r["projection"]
    table.add_row("GPT-2-small job (5 x 1M tokens) here", f"{p['projected_total_hours_cache0']:.1f} h "
                  f"(engine {p['projected_engine_hours']:.1f} h at {p['engine_stream_gflops']:.0f} GFLOP/s, "
                  f"forward {p['projected_forward_hours_cache0']:.1f} h)", "seed document: 2-4 h on a GPU")
    table.add_row("CUDA", p["cuda"], "")
    w = r["workers"]
    table.add_row("analysis time WORKERS=2 / WORKERS=1", f"{w['ratio_2_over_1']:.2f} ({w['workers_2_s']:.1f} s / "
                  f"{w['workers_1_s']:.1f} s, {w['cores']} cores)", "<= 1")
    console.print(table)
    console.print(f"Wrote {OUT} ({sum(results['step_seconds'].values()):.0f} s of measurement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
