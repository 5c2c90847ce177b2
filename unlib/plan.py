"""What a correlation will cost before it runs (`make plan`): tasks, passes over the tokens,
memory on the device and the host, bytes read from the activation caches, FLOPs, and a time
estimated from this machine's measured matmul and QR rates on the chosen device. Nothing is
loaded but the models' shapes; nothing is written."""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from unlib.engine.planning import WorkPlan
from unlib.engine.precision import Products
from unlib.engine.rotations import haar_orthogonal

GiB = 2**30


@dataclasses.dataclass
class CorrelationPlan:
    """The figures of one correlation (one engine's plan: its references, rotations and
    budget), split into `parallel` or more tasks, over `n_tokens` tokens."""

    engine: WorkPlan
    n_tokens: int
    parallel: int = 1
    caches_bytes: int = 0  # every model's activation cache
    free_disk: int = 0  # under the store
    cache: str = "auto"  # the CACHE setting
    feed_reason: str = ""  # why the feed is the one the engine plans for

    def __post_init__(self):
        self.groups = self.engine.groups(self.parallel)

    @property
    def accumulator_bytes(self) -> int:
        """Every unit's co-moments (both halves), summed over the whole plan."""
        return sum(self.engine.accumulator_bytes(units) for units in self.groups)

    @property
    def floor_passes(self) -> int:
        """Passes no plan can beat: the accumulators over the budget."""
        return math.ceil(self.accumulator_bytes / self.engine.memory_budget)

    @property
    def peak_device_bytes(self) -> int:
        return max(self.engine.pass_bytes(units) for units in self.groups)

    @property
    def peak_host_bytes(self) -> int:
        """Host memory of the widest task: the feed's read-ahead chunks and the Gaussians of the
        Haar draws (on the CPU, part of the device bytes)."""
        return max(self.engine.host_bytes(units) for units in self.groups)

    @property
    def bytes_read(self) -> int:
        """Activation-cache bytes the tasks read: each reads its layers' columns of every token."""
        return sum(self.engine.bytes_read(units, self.n_tokens) for units in self.groups)

    @property
    def stream_flops(self) -> float:
        return sum(self.engine.stream_flops(units, self.n_tokens) for units in self.groups)

    @property
    def forward_flops(self) -> float:
        return sum(self.engine.forward_flops(units, self.n_tokens) for units in self.groups)

    @property
    def reduce_flops(self) -> float:
        return sum(self.engine.reduce_flops(units) for units in self.groups)

    @property
    def rotation_draws(self) -> list[int]:
        """The size of every Haar rotation drawn (one QR each), over all tasks."""
        return [d for units in self.groups for d in self.engine.rotation_sizes(units)]

    def seconds(self, matmul_flops_per_s: float, qr_seconds_per_cube: float) -> float:
        """Estimated compute time: the GEMM work at the measured matmul rate and each QR at the
        measured seconds per n^3, the no-cache feed's forward passes at the matmul rate. The
        HDF5 feed overlaps the arithmetic (read-ahead) and is not counted."""
        qr = qr_seconds_per_cube * sum(d ** 3 for d in self.rotation_draws)
        return (self.stream_flops + self.reduce_flops + self.forward_flops) / matmul_flops_per_s + qr


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(t: int, rows: int, cols: int, device: str | torch.device = "cpu", seconds: float = 1.0,
                precision: str = "fp32") -> float:
    """FLOP/s of the engine's GEMM shape (t x rows)^T (t x cols) on `device` with the stream's
    products in `precision` (unlib.engine.precision; bf16x3's three products count as one),
    sustained over at least `seconds` of back-to-back products: a single product of a few
    milliseconds catches a CPU's short bursts (on a shared 2-core VM one shape read 77 to 160
    GFLOP/s), which a long run does not keep up."""
    device = torch.device(device)
    products = Products(precision, device)
    a = products.operand(torch.randn(t, rows, device=device))
    b = products.operand(torch.randn(t, cols, device=device))
    acc = torch.zeros(rows, cols, device=device)
    with products.switches():
        best_seconds(lambda: products.add(acc, a, b), device, 1)  # warm-up: allocation, kernel choice
        calls, batch, start = 0, 1, time.perf_counter()
        while True:
            for _ in range(batch):
                products.add(acc, a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            calls += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * t * rows * cols * calls / elapsed
            batch = calls  # double the products before the next look at the clock (no sync per product)


def qr_seconds_per_cube(device: str | torch.device = "cpu", n: int = 512, repeats: int = 3) -> float:
    """Seconds per n^3 of a Haar draw (its Gaussian and QR) of n x n on `device`: timed at the
    run's width (up to 1536), where the QR's n^3 is most of it and the Gaussian's n^2 little."""
    device = torch.device(device)
    return best_seconds(lambda: haar_orthogonal(n, [n], device), device, repeats) / n ** 3


def measured_rates(plan: CorrelationPlan) -> tuple[float, float] | None:
    """(matmul FLOP/s in the plan's GEMM shape and precision, seconds per n^3 of a QR) measured on the
    plan's device, or None when that device is not on this machine."""
    device = plan.engine.device
    if device.type == "cuda" and not torch.cuda.is_available():
        return None
    sizes = plan.engine.layer_sizes
    d = max(max(s) for s in sizes)
    t = min(plan.engine.chunk_tokens, 2048)  # a block-bounded run of a chunk, one GEMM
    return (matmul_rate(t, d, min(4 * d, max(sum(s) for s in sizes)), device, precision=plan.engine.precision),
            qr_seconds_per_cube(device, min(d, 1536)))


def human_time(seconds: float) -> str:
    """A duration as people say it: seconds, minutes, hours or days."""
    for unit, size in (("days", 86400), ("hours", 3600), ("min", 60)):
        if seconds >= 1.5 * size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:,.0f} s"


def describe(plan: CorrelationPlan, names: list[str], rates: tuple[float, float] | None) -> list[str]:
    """The plan as the lines `make plan` prints."""
    engine = plan.engine
    shapes = sorted({(len(s), s[0]) for s in engine.layer_sizes})
    shape = ", ".join(f"{n} layers x {d}" for n, d in shapes)
    refs = "all" if len(engine.references) == len(names) > 1 else ", ".join(names[r] for r in engine.references)
    passes = len(engine.passes)
    chunk = engine.chunk_tokens
    lines = [
        f"models          {len(names)} ({shape} neurons), {plan.n_tokens:,} tokens, reference {refs}, "
        f"{engine.n_rotations} rotations, on {engine.device}, {engine.precision} products",
        f"memory budget   {engine.memory_budget / GiB:,.2f} GiB a task on {engine.device.type} (CORR_MEMORY)",
        f"accumulators    {plan.accumulator_bytes / GiB:,.2f} GiB: {passes} pass{'es' if passes != 1 else ''} over "
        f"the tokens (the floor, accumulators / budget: {plan.floor_passes})",
        f"tasks           {len(plan.groups)} CorrelationBlock (PARALLEL {plan.parallel}) and 1 Correlations merge"
        + (f"; {len(names)} CacheActivations" if engine.feed is None else ""),
        f"caches          {plan.caches_bytes / GiB:,.2f} GiB for all models; CACHE=auto "
        f"{'would write them' if plan.caches_bytes <= 0.9 * plan.free_disk else 'would not write them'}: "
        f"{plan.free_disk / GiB:,.1f} GiB free under the store",
        f"feed            {'activation caches' if engine.feed is None else 'models run on the device (no cache)'}, "
        f"because {plan.feed_reason}",
        f"chunk           {engine.chunk_rows():,} tokens ({engine.activation_bytes(engine.chunk_rows()) / GiB:,.2f} GiB "
        f"for all models{'' if engine.feed is None else f', {engine.feed.sequences(chunk)} sequence(s) a forward pass'})",
        f"peak memory     {plan.peak_device_bytes / GiB:,.2f} GiB on {engine.device.type} a task"
        + ("" if engine.device.type == "cpu" else f", {plan.peak_host_bytes / GiB:,.2f} GiB on the host"),
        f"bytes read      {plan.bytes_read / GiB:,.2f} GiB of activation caches "
        f"({plan.bytes_read / engine.activation_bytes(plan.n_tokens):.2f} x the caches)" if engine.feed is None else
        f"forward passes  {len(plan.groups)} x {plan.n_tokens:,} tokens through the models a block reads",
        f"FLOPs           {plan.stream_flops:.3g} streaming, {plan.reduce_flops:.3g} reducing, "
        + (f"{plan.forward_flops:.3g} in forward passes, " if engine.feed is not None else "")
        + f"{len(plan.rotation_draws):,} Haar rotations drawn (QR)",
    ]
    if rates is None:
        lines.append(f"estimated time  no {engine.device.type} device here to measure: run `make plan` on it")
    else:
        matmul, qr = rates
        lines.append(f"estimated time  {human_time(plan.seconds(matmul, qr))} of compute on {engine.device} "
                     f"(measured here: {matmul / 1e9:,.1f} GFLOP/s {engine.precision} matmul, "
                     f"QR {qr * 1e9:.2f} s per 1000^3)")
    return lines
