"""One exception type for every failure a user can fix (bad argument, missing file, unknown name).

The CLI turns it into a one-line message and exit code 2 instead of a traceback; library callers
can catch it to tell user errors apart from bugs.
"""


class EdgeweaveError(Exception):
    """A failure caused by input the user controls; its message says what was expected where."""
