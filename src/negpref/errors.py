"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class NegprefError(Exception):
    """A problem the user can fix (bad file, bad option, existing output). Say what to fix."""
