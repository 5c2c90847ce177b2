import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MINI_ZOO = "toy-zoo-mini"
TRAIN_MINI_ZOO = f"""
import luigi
from tasks.zoo import TrainToyModel
from unlib.models import ZOOS
ok = luigi.build([TrainToyModel(zoo="{MINI_ZOO}", seed=s) for s in ZOOS["{MINI_ZOO}"].seeds], local_scheduler=True)
raise SystemExit(0 if ok else 1)
"""


@pytest.fixture(scope="session")
def mini_zoo(tmp_path_factory) -> Path:
    """The mini zoo's `zoo/` folder, trained once per test session through the pipeline's own
    training tasks; tests copy it into their stores (copies: some damage weights) instead of
    training again."""
    store = tmp_path_factory.mktemp("mini-zoo")
    proc = subprocess.run([sys.executable, "-c", TRAIN_MINI_ZOO], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "UNLIB_STORE": str(store)}, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return store / "zoo"

