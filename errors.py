"""
The errors a user can fix. Library code raises them with a message written for the person at
the keyboard (what is wrong, where, and what to do); the scripts let them through, and exits.py
prints them as one `error:` line with exit code 1. Any other exception is a bug, and its
traceback is what finds it.
"""


class UserError(Exception):
    """Bad input: the message names the key, file or folder and what to do about it."""


class ConfigError(UserError, ValueError):
    """A bad config key or value, or settings that do not go together."""


class DataError(UserError):
    """Bad data on disk or a broken source: a token file, meta.json, a task file, a download."""


class CheckpointError(UserError):
    """No checkpoint where one was expected, a damaged or foreign one, or a run that does not
    match the command that continues it."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm became NaN or infinite: a learning rate too high, no
    gradient clipping, float16 overflow. The last checkpoint still holds finite weights."""
