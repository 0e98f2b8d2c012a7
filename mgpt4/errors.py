"""One error hierarchy for the whole package.

Library code raises these; only ``mgpt4.cli`` turns them into a one-line message and an exit code
(usage / bad input → 2, runtime failure → 1). Messages name the file or key and say what to do.
"""


class Mgpt4Error(Exception):
    """Base class: a failure the user can act on, reported as one line."""

    exit_code = 1


class UsageError(Mgpt4Error):
    """The command line or its inputs are wrong (bad option value, missing path)."""

    exit_code = 2


class ConfigError(UsageError):
    """A recipe or override names an unknown key or a value of the wrong type."""


class DataError(Mgpt4Error):
    """A data set, shard or URL list cannot be read as expected."""


class CheckpointError(Mgpt4Error):
    """A weight file is missing, unsafe, truncated, or does not fit the model."""
