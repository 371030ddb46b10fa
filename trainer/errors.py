"""Errors that mean "the user asked for something that cannot work": the entry point prints them
as one clear line (what is wrong and what to do) instead of a stack trace. They subclass the
built-in exception of the same meaning, so callers may catch either."""


class UserError(Exception):
    """Base of errors caused by input or configuration, with a message that says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or shard the run needs does not exist."""


class MissingDependencyError(UserError, ImportError):
    """An optional package needed for what was asked is not installed."""


class NonFiniteTrainingError(UserError, FloatingPointError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


class DataError(UserError, RuntimeError):
    """The data yields nothing to train on, or too much of it is skipped."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that cannot be read safely: truncated, not a checkpoint, or holding code."""


class DiskFullError(UserError, OSError):
    """A write failed for lack of space."""
