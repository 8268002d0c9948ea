"""Errors a user can fix. Every stage's command line prints their message as one line and
exits with status 2; anything else is a bug and keeps its traceback."""


class PipelineError(Exception):
    """Bad input or configuration; the message names the file, key or value and what is valid."""


class MissingInputError(PipelineError, FileNotFoundError):
    """An earlier stage's output is not there yet."""
