"""Universal neurons library: models, data, activation caches, the correlation engine,
neuron statistics, selection, plots and reports. Plain Python, no Luigi."""
