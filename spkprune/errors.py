"""The one exception type for errors a user can cause.

The CLI catches it, prints its message as one line on stderr and exits with code 2.
"""


class SpkpruneError(Exception):
    """A user-facing error: bad path, unknown preset or tag, wrong shape, corrupt file, bad recipe key."""

    exit_code = 2
