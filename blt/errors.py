"""One exception type for user mistakes: bad input, bad paths, bad checkpoints.

The CLI prints its message and exits non-zero without a traceback; anything else is a bug.
"""


class BltError(ValueError):
    pass
