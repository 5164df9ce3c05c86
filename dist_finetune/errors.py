"""Errors a user can act on: each message names the file or setting and the fix.

The CLI prints a :class:`UserError` as one line and exits 2; any other exception is a bug and keeps
its traceback. Each type also derives from the builtin a caller would catch without knowing ours
(``ValueError`` for bad input, ``RuntimeError`` for a broken launch).
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a path, a setting, a launch command); never an internal bug."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; raised before any data is read or model built."""


def check_choice(setting: str, value, choices: tuple, unset_allowed: bool = False) -> None:
    """A ConfigError naming ``setting``, its choices and the value given, unless the value is one of them
    (or None, with ``unset_allowed``)."""
    if value not in choices and not (unset_allowed and value is None):
        raise ConfigError(f"{setting} must be one of {choices}, got {value!r}")


class DataError(UserError, ValueError):
    """A problem with the user's images or dataset; the message names the path and the fix."""


class BackboneError(UserError, ValueError):
    """An unknown backbone, an unreadable or mismatched weights file, or an impossible download."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, corrupt, or made for another model; the message says which."""


class DistributedSetupError(UserError, RuntimeError):
    """The processes do not form the job they were launched as."""


class RankMismatchError(UserError, RuntimeError):
    """Ranks hold different trainable parameters or optimizer layouts (a strategy or callback acted on some ranks only)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the last good checkpoint."""
