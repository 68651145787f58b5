"""The one exception type for errors a user can cause (bad file, bad config key, ...).

The CLI prints its message as a single line and exits 1, without a traceback.
"""


class MegfbError(Exception):
    """A user-facing error; the message is one sentence naming the file or key at fault."""
