"""Luigi tasks of the universal-neurons pipeline: thin wrappers that declare parameters,
dependencies and file targets, and call the `unlib` library to do the work."""
import os
import sys

# Before torch loads OpenMP: idle torch threads sleep instead of spinning, so a run whose threads
# share the cores with other processes (other workers, other users) is not slowed several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Top-level modules of requirements.txt (and their pip names where they differ).
DEPENDENCIES = {"torch": "torch", "transformer_lens": "transformer-lens", "transformers": "transformers",
                "tokenizers": "tokenizers", "datasets": "datasets", "luigi": "luigi", "h5py": "h5py",
                "numpy": "numpy", "pandas": "pandas", "scipy": "scipy", "matplotlib": "matplotlib", "rich": "rich",
                "psutil": "psutil", "safetensors": "safetensors", "pyarrow": "pyarrow"}

try:
    from tasks.zoo import ZooTokenizer, ZooTrainingTokens, TrainToyModel  # noqa: F401
    from tasks.data import TokenizeDataset  # noqa: F401
    from tasks.activations import CacheActivations  # noqa: F401
    from tasks.correlation import Correlations  # noqa: F401
    from tasks.analysis import (ExcessCorrelation, NeuronStats, SelectUniversal, Plots,  # noqa: F401
                                UniversalNeuronsAnalysis)
    from tasks.ablation import Ablation  # noqa: F401
    from tasks.report import RunReport, CompareCheckpoints  # noqa: F401
except ModuleNotFoundError as exc:
    # `python -m tasks` (what make runs; sys.argv[0] is "-m" while the package is imported) with
    # an interpreter that lacks a dependency (PYTHON=python3): one line, not a traceback.
    package = DEPENDENCIES.get((exc.name or "").split(".")[0])
    if sys.argv[:1] != ["-m"] or package is None:
        raise
    sys.stderr.write(f"error: the Python package {package!r} is missing from {sys.executable} (no module named "
                     f"{exc.name!r}); install the dependencies with `{sys.executable} -m pip install -r "
                     f"requirements.txt`, or leave PYTHON unset so that make builds .venv\n")
    raise SystemExit(2) from None
