"""The one error type of the data layer."""


class DataError(ValueError):
    """Bad data or data settings. The message names the file (and line) and says how to fix it."""
