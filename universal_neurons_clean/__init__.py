"""The seed document's notebook API, under the seed's module name: the same objects as the
pipeline's own (no second implementation).

    from universal_neurons_clean import (run_universal_neurons_analysis,
                                         MemoryEfficientExcessCorrelationComputer, UniversalNeuronAnalyzer)
    results = run_universal_neurons_analysis(model_names="toy-zoo", dataset_path="python-stdlib",
                                             checkpoint_value=1000, excess_threshold=0.3, batch_size=32)

`python -m universal_neurons_clean` (or the `universal-neurons` command) is the command line,
with the seed's --test, --checkpoint N and --compare-checkpoints "100 250"."""
from tasks.api import run_universal_neurons_analysis
from unlib.notebook import MemoryEfficientExcessCorrelationComputer
from unlib.plots import UniversalNeuronVisualizer
from unlib.selection import UniversalNeuronAnalyzer
from unlib.stats import NeuronStatsGenerator

__all__ = ["run_universal_neurons_analysis", "MemoryEfficientExcessCorrelationComputer", "UniversalNeuronAnalyzer",
           "NeuronStatsGenerator", "UniversalNeuronVisualizer"]
