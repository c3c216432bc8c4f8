"""The exception types a command turns into one `error:` line: bad input (a file, a sweep, a flag
or a value the user gave), status 2, and a write the machine refused while a run went on (a
full disk), status 1.
"""


class InputError(Exception):
    """Bad user input; the message is one line that names the input and the problem."""

    status = 2  # the exit status of a command that stops on it


class WriteError(InputError):
    """A write the machine refused during a run (a full disk); the message is one line that
    names what could not be written and what was kept."""

    status = 1
