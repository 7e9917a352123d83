"""The one exception type for bad user input."""


class InputError(ValueError):
    """Bad input from the user (a file, a directory, a config value).

    The message is one line that names the file or key and the problem; the CLI prints it and exits 2.
    """
