"""The arithmetic of the stream's products (PRECISION): fp32, or the reduced-precision
products of tensor cores (NVIDIA TF32, bf16) and of AMX CPUs (bf16), with their error
against float64 measured by `make bench`. Whatever the mode, the rows are centred in float32
before any rounding and every product accumulates into float32 co-moments; only the operands
of the products are rounded.

- fp32: IEEE float32 products.
- tf32: operands rounded to TF32 (10 mantissa bits). On a GPU, torch's own switch
  (torch.backends.cuda.matmul.fp32_precision); a CPU has no TF32 units, so the operands are
  rounded explicitly and multiplied in float32: the same numbers, at float32 speed.
- bf16: operands rounded to bfloat16 (7 mantissa bits). On the CPU, torch's oneDNN switch
  (torch.backends.mkldnn.matmul.fp32_precision = "bf16", AMX where the CPU has it); on a GPU
  torch has no such switch, so the operands are cast and multiplied into float32 (addmm's
  out_dtype into a float32 accumulator, torch >= 2.10).
- bf16x3: each operand split into two bfloat16 parts, x = hi + lo, and three products
  hi·hi + hi·lo + lo·hi (the lo·lo term is below float32's rounding): about float32's
  accuracy at bf16 speed; torch has no switch for it, so the split is written here.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from unlib import UserError

PRECISIONS = ("fp32", "tf32", "bf16", "bf16x3")
# A mode is a device's default only when its measured error is below this: a max correlation
# is compared with a threshold under a split-half error of about 0.01 (make bench measures it).
ERROR_BOUND = 1e-3
# The largest |difference| from float64 of any max or rotated-baseline correlation, measured by
# `make bench` on the toy zoo's step-1000 activation caches (5 models x 512 neurons, 100,000
# tokens, R = 5; 2-core Xeon with AMX, torch 2.13, 2026-12-07), rounded up: the error each mode
# is documented and tested (tests/test_precision.py) to stay within.
DOCUMENTED_ERROR = {"fp32": 1e-6, "tf32": 1e-4, "bf16": 5e-4, "bf16x3": 5e-6}
# The fastest mode under ERROR_BOUND, per device type: on a CPU with AMX-bf16, bf16 (2.5x fp32's
# rate on the stream's GEMMs here); on a CPU without it, fp32 (oneDNN would emulate bf16);
# on a GPU, tf32 (torch's own switch; bf16's path there has not been measured on a card yet).
GPU_DEFAULT = "tf32"


@functools.lru_cache(maxsize=1)
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in AMX tiles (Linux reports the flag)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and " amx_bf16" in line for line in info)
    except OSError:
        return False


def default_precision(device: str | torch.device) -> str:
    """The fastest mode whose measured error is below ERROR_BOUND on `device`'s type."""
    kind = torch.device(device).type
    if kind == "cpu":
        return "bf16" if cpu_has_amx_bf16() else "fp32"
    return GPU_DEFAULT if kind == "cuda" else "fp32"


def check_precision(precision: str, device: str | torch.device) -> None:
    """Refuse a mode `device` cannot run, in one line."""
    kind = torch.device(device).type
    if precision not in PRECISIONS:
        raise UserError(f"PRECISION={precision!r} must be one of {', '.join(PRECISIONS)}")
    if kind not in ("cpu", "cuda") and precision != "fp32":
        raise UserError(f"PRECISION={precision} runs on cpu or cuda only; use PRECISION=fp32 on {kind}")


def round_to_tf32_(x: torch.Tensor) -> torch.Tensor:
    """Round contiguous float32 `x` in place to TF32's 10 mantissa bits (to nearest, ties away
    from zero), and return it."""
    x.view(torch.int32).add_(0x1000).bitwise_and_(-0x2000)
    return x


class Products:
    """The stream's products in one precision on one device: `operand(x)` prepares a centred
    float32 block once (its parts), `add(acc, a, b)` adds a^T b of two prepared blocks (or
    their column slices, part by part) into a float32 accumulator, inside `switches()`."""

    def __init__(self, precision: str, device: str | torch.device):
        check_precision(precision, device)
        self.precision = precision
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"

    def operand(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The parts of centred float32 rows `x` the products read (x may be overwritten)."""
        if self.precision == "tf32" and not self.on_gpu:
            return (round_to_tf32_(x),)
        if self.precision == "bf16" and self.on_gpu:
            return (x.to(torch.bfloat16),)
        if self.precision == "bf16x3":
            hi = x.to(torch.bfloat16)
            lo = x.sub_(hi.float())  # what bfloat16 left out (rounded to bfloat16 by the product)
            return (hi, lo.to(torch.bfloat16)) if self.on_gpu else (hi.float(), lo)
        return (x,)

    @staticmethod
    def columns(parts: tuple[torch.Tensor, ...], cols: slice) -> tuple[torch.Tensor, ...]:
        return tuple(p[:, cols] for p in parts)

    def add(self, acc: torch.Tensor, a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
        """acc += a^T b, a and b prepared by operand()."""
        pairs = ((0, 0),) if len(a) == 1 else ((0, 0), (0, 1), (1, 0))
        for i, j in pairs:
            if a[i].dtype == torch.bfloat16:
                torch.addmm(acc, a[i].T, b[j], out_dtype=torch.float32, out=acc)
            else:
                acc.addmm_(a[i].T, b[j])

    @contextlib.contextmanager
    def switches(self) -> Iterator[None]:
        """torch's matmul switches set for this mode (and set back after), so that nothing
        else the process multiplies (a model's forward pass, the result step) is rounded."""
        if self.on_gpu:
            with _fp32_precision(torch.backends.cuda.matmul, "tf32" if self.precision == "tf32" else "ieee"):
                yield
        elif self.device.type == "cpu":  # torch < 2.9 has no mkldnn.matmul: the global setting instead
            with _fp32_precision(getattr(torch.backends.mkldnn, "matmul", None),
                                 "bf16" if self.precision in ("bf16", "bf16x3") else "ieee"):
                yield
        else:
            yield

    def extra_copies(self) -> float:
        """Working copies of the centred rows the products hold besides them, in float32 sizes:
        on a GPU bf16's cast of every model's rows, on the CPU oneDNN's bfloat16 copies of one
        GEMM's two operands (about a quarter of the rows of two or three models; measured with
        unlib/memory_check.py, they varied from run to run); bf16x3's two parts besides."""
        buffers = 0.5 if self.on_gpu else 0.25
        return {"bf16": buffers, "bf16x3": 1.0 + (0.0 if self.on_gpu else buffers)}.get(self.precision, 0.0)


@contextlib.contextmanager
def _fp32_precision(backend, value: str) -> Iterator[None]:
    """Set `backend.fp32_precision` (torch >= 2.9) for the block; older torch (or no such
    backend): the global float32 matmul precision ("high": TF32, "medium": oneDNN's bf16)."""
    if backend is not None and hasattr(backend, "fp32_precision"):
        before = backend.fp32_precision
        backend.fp32_precision = value
        try:
            yield
        finally:
            backend.fp32_precision = before
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision({"ieee": "highest", "tf32": "high", "bf16": "medium"}[value])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def runnable_precisions(device: str | torch.device) -> list[str]:
    """The modes `device` runs: those whose self-check passes (a CPU whose oneDNN has no
    bfloat16 refuses bf16; a torch without addmm's out_dtype refuses a GPU's bf16)."""
    here = []
    for mode in PRECISIONS:
        try:
            self_check(Products(mode, device))
            here.append(mode)
        except UserError:
            pass
    return here


def self_check(products: Products) -> None:
    """Multiply a small block through `products` and compare with float64: a mode this torch
    or device cannot run, or runs wrong, is refused in one line before a stream starts."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 64, generator=gen), torch.randn(512, 48, generator=gen)
    acc = torch.ones(64, 48, device=products.device)
    want = 1 + a.double().T @ b.double()
    try:
        with products.switches():
            products.add(acc, products.operand(a.to(products.device)), products.operand(b.to(products.device)))
    except (RuntimeError, TypeError) as error:
        raise UserError(f"PRECISION={products.precision} cannot run on {products.device} with torch "
                        f"{torch.__version__} ({str(error).splitlines()[0]}); use PRECISION=fp32 or tf32") from None
    # each operand rounded to 2^-9 (bf16) or 2^-12 (tf32) relative: a sum of 512 products of
    # unit Gaussians then errs by up to about 0.4 or 0.05
    worst = float((acc.double().cpu() - want).abs().max())
    if products.precision == "bf16" and worst < 1e-3:  # oneDNN computes in float32 on CPUs without bf16
        raise UserError(f"PRECISION=bf16 computes in float32 on this {products.device.type} (no bfloat16 "
                        "matrix units torch can use); use PRECISION=fp32, the same numbers")
    if worst > {"bf16": 2.0, "tf32": 0.25}.get(products.precision, 1e-3):
        raise UserError(f"PRECISION={products.precision} on {products.device} gave products off by {worst:.3g} "
                        "from float64; use PRECISION=fp32")
