"""The one exception type meant for users: its message names the file or source and the problem."""


class StudioError(Exception):
    """A user error (bad file, bad argument, missing model). CLIs print it in one line and exit 2."""
