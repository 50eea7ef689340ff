"""The one exception type for problems a user can fix (config, data, paths, missing packages), and
``BadRow``: one data row that cannot be used (counted as dropped, or reported at its file:line)."""


class UserError(Exception):
    """Raised for mistakes a user can fix; the CLI prints the message as one paragraph and exits 2."""


class BadRow(ValueError):
    """A row that cannot be used: ``reason`` is the drop reason, ``detail`` names the field.

    Defined here so that every data module can raise it (mistral_tune.data.messages re-exports it)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail
