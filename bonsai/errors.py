"""User-facing errors: one clear line, non-zero exit from the CLI."""


class BonsaiError(Exception):
    """A bad input or an impossible request. The message is shown to the user as one line."""
