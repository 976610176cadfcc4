"""The one exception type users see: its message is a single line saying what is wrong and how to fix it."""


class NemesisError(ValueError):
    """Bad input from the user (a file, a flag, a data folder). The CLI prints it and exits with code 2."""
