"""Errors a user can fix (bad file, bad option, corrupt checkpoint...).

The CLI prints a UserError as one line and exits with status 2, with no traceback; anything
else is a bug and keeps its traceback. UserError subclasses ValueError so library callers
that catch ValueError keep working."""


class UserError(ValueError):
    """Bad input that the user can fix; the message says what is wrong and what to do."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the model."""
