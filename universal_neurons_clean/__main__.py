"""`python -m universal_neurons_clean`: the `universal-neurons` command (tasks/__main__.py)."""
from tasks.__main__ import entry_point

entry_point()
