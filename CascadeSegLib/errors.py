"""Exceptions that carry a one-line message for the user.

`UserError` is a problem with the input or the request (CLI exit code 2, a message box in
Slicer); anything else is a bug (exit code 1 with a log file).
"""


class UserError(Exception):
    """Bad input or request: the message says what is wrong and what to do."""


class ModelError(UserError):
    """A model package is missing, damaged, or does not fit the request."""


class Cancelled(Exception):
    """The user cancelled the work; nothing was written."""
