"""The one exception type users see: its message is a single line saying what is wrong and how to fix it."""


class NemesisError(ValueError):
    """Bad input from the user (a file, a flag, a data folder). The CLI prints it and exits with code 2."""


class NemesisNote(UserWarning):
    """Something the user should know but that is not an error (e.g. a guessed activation); the CLI prints
    it as one `note:` line on stderr."""
