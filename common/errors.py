"""The one exception type that scripts turn into a single line on stderr and exit status 2."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong checkpoint); printed as one line, never a traceback."""
