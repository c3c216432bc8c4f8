"""The one exception type for bad input: a file, a sweep, a flag or a value the user gave.

Command-line entry points catch it and print its message as one line, then exit with status 2.
"""


class InputError(Exception):
    """Bad user input; the message is one line that names the input and the problem."""
