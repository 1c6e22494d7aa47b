"""The one exception type for a user's mistake: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input from a person: a file, a tensor, a flag. The message names it and says what was
    expected; no traceback is shown for it."""
