"""One exception type for everything a user can get wrong.

The CLI prints a `G3nError` as a single line (no traceback); anything else is a bug.
"""


class G3nError(Exception):
    """A problem with the user's input: a file, a key, an option. The message names it."""
