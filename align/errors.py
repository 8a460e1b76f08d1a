"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class AlignError(Exception):
    """A problem with the user's input or environment, with a message that says what to do about it."""


class ConfigError(AlignError):
    """A config file or command-line override is invalid."""


class DataError(AlignError):
    """An input data file is missing, malformed or lacks required columns."""


class ModelError(AlignError):
    """A model spec cannot be resolved or loaded."""
