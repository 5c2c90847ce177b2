"""The correlation's memory plan is what happens: one pass's measured peak (the resident
set's, on this CPU) is within 15 % of the plan's pass_bytes for the cache and the no-cache
feed on three shapes of random-weight GPT-2 models (`make bench` measures larger ones)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unlib.engine.memory import ModelFeed, ModelFootprint
from unlib.engine.planning import WorkPlan

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc")
def test_measured_peaks_are_within_15_percent_of_the_plan(tmp_path):
    out = subprocess.run([sys.executable, "-m", "unlib.memory_check", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert {(r["shape"], r["feed"]) for r in results} == {(r["shape"], f) for r in results for f in ("caches", "models")}
    assert len(results) == 6
    off = [r for r in results if not 0.85 <= r["measured"] / r["planned"] <= 1.15]
    assert not off, out.stdout


def test_the_no_cache_feed_counts_weights_forward_passes_and_whole_sequences():
    sizes = [[1024] * 2] * 2
    footprint = ModelFootprint(100 * 2**20, 256, 4, 1024)
    caches = WorkPlan(sizes, 0, 2, "cpu", 2**40, chunk_tokens=1000)
    models = WorkPlan(sizes, 0, 2, "cpu", 2**40, chunk_tokens=1000, feed=ModelFeed((footprint, footprint), 300))
    assert caches.chunk_rows() == 1000 and models.chunk_rows() == 900  # three whole sequences of 300
    units = models.passes[0]
    stream_cpu = models.stream_bytes(units)
    chunk = 4 * 900 * 4096
    centred = 4 * (900 + 1) * (4096 + 1024)
    forward = footprint.forward_bytes(3, 300)
    assert forward == 4 * 3 * 300 * (4 * 300 + 3 * 1024 + 6 * 256)
    assert stream_cpu == (2 * 2 * footprint.weight_bytes + chunk + max(forward, centred), 0)
    gpu = WorkPlan(sizes, 0, 2, "cuda", 2**40, chunk_tokens=1000, feed=ModelFeed((footprint, footprint), 300))
    assert gpu.stream_bytes(units) == (2 * footprint.weight_bytes + chunk + max(forward, centred),
                                       footprint.weight_bytes)
    # the cache feed: four chunks on the host, one on a GPU
    assert caches.stream_bytes(units)[1] == 4 * 4 * 1000 * 4096
    # a one-sequence minimum when the context is longer than a chunk
    assert WorkPlan(sizes, 0, 2, "cpu", 2**40, chunk_tokens=256,
                    feed=ModelFeed((footprint, footprint), 512)).chunk_rows() == 512
