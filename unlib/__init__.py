"""Universal neurons library: models, data, activation caches, the correlation engine,
neuron statistics, selection, plots and reports. Plain Python, no Luigi."""


class UserError(ValueError):
    """A problem with what the user asked for (a model, dataset, number or file): reported
    as one line saying what is wrong and how to fix it, without a traceback."""
