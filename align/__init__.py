"""align: the preference-data flywheel (generate, label, train, reuse, evaluate)."""

__version__ = "0.1.0"
