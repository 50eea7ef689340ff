"""The one exception type for problems a user can fix (config, data, paths, missing packages)."""


class UserError(Exception):
    """Raised for mistakes a user can fix; the CLI prints the message as one paragraph and exits 2."""
