"""Luigi tasks of the universal-neurons pipeline: thin wrappers that declare parameters,
dependencies and file targets, and call the `unlib` library to do the work."""
from tasks.zoo import ZooTokenizer, ZooTrainingTokens, TrainToyModel  # noqa: F401
from tasks.data import TokenizeDataset  # noqa: F401
from tasks.activations import CacheActivations  # noqa: F401
from tasks.correlation import Correlations  # noqa: F401
from tasks.analysis import (ExcessCorrelation, NeuronStats, SelectUniversal, Plots,  # noqa: F401
                            UniversalNeuronsAnalysis)
from tasks.report import RunReport, CompareCheckpoints  # noqa: F401
