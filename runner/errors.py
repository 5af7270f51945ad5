"""The one exception type users see.

Library code raises :class:`RunnerError` for anything the user can fix (a bad
path, a bad setting, an unreadable checkpoint). The CLI prints its message as
one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class RunnerError(Exception):
    """A problem with the user's input, explained in one line."""
