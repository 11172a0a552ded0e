"""Errors caused by the user's input (files, values, weights), not by a bug.

The CLIs (:func:`mam2_fast.train.distributed.run_cli`) print a :class:`UserError` as one line,
from rank 0 only, and exit with code 1; any other exception keeps its traceback. The
subclasses also derive from the built-in type code used to raise there (``FileNotFoundError``,
``ValueError``, ``RuntimeError``), so ``except FileNotFoundError`` keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: the message says what and where (file, line, key)."""

    exit_code = 1
    prefix = "error"        # the CLI prints "<prefix>: <message>"


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A named input file or folder does not exist."""


class UserValueError(UserError, ValueError):
    """A malformed input (list file line, label, weights file)."""


class DataError(UserError, RuntimeError):
    """The dataset cannot feed the run (too many unreadable videos)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read (missing, corrupt, disk full, read-only folder)."""


class OutputDirError(UserError, RuntimeError):
    """``train.output_dir`` holds another run, or cannot be written."""


__all__ = ["CheckpointError", "DataError", "OutputDirError", "UserError", "UserFileNotFoundError", "UserValueError"]
