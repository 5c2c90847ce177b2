"""`make rehearse` at a smaller size (slow): random-weight models of 3 x 4 x 1024 neurons, a
CORR_MEMORY forcing several passes, with caches and without, killed once a block is on disk
and resumed with other WORKERS and CORR_MEMORY; the same results, no block made twice."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_a_killed_multi_pass_run_resumes_with_other_workers_and_budget_redoing_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.rehearse", "small", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["feed"] for r in rows] == ["caches", "models"]
    for r in rows:
        assert r["passes"] >= 3 and r["identical"], r
        assert 1 <= r["blocks_before_kill"] == r["blocks_reused"] < r["passes"], r
    assert proc.returncode == 0, proc.stderr
