"""The command-line plumbing shared by `sweep`, `bench`, `profile` and `report`.

Every command refuses bad input the same way: one line `error: ...` on stderr, exit status 2,
no traceback, and nothing written. `Parser` turns a bad flag into an `InputError`, and
`command` turns any `InputError` raised by an entry point into that line and status.
"""

import argparse
import contextlib
import functools
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from uspsjax.errors import InputError, WriteError


class Parser(argparse.ArgumentParser):
    """argparse whose bad flags raise InputError (one line, exit 2 under `command`) instead of
    printing the usage and exiting."""

    def error(self, message):
        raise InputError(message)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def networks(names) -> tuple[str, ...]:
    """The networks a `--networks` flag names (comma-separated text, or a sequence of names
    from the Python API), checked against `models.NETWORKS`; InputError for an unknown or
    empty one. Also an argparse type."""
    from uspsjax.models import NETWORKS  # JAX: only where networks are named
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]  # "fc," is "fc"
    names = tuple(str(n) for n in names)
    bad = [n for n in names if n not in NETWORKS] or ([] if names else [""])
    if bad:
        raise InputError(f"--networks: unknown network {bad[0]!r} (known: {', '.join(NETWORKS)})")
    return names


def check_out(out: Path) -> None:
    """Raise InputError unless `out` is, or can be made, a writable folder; creates nothing."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{out}: the output folder is a file")
    # Try it: permission bits say nothing for root, nor for read-only or virtual file systems.
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise InputError(f"{out}: the output folder is not writable ({e.strerror})") from None


def write_text(path: Path, text: str) -> None:
    """Write the file `path` whole or not at all: a temporary file beside it, renamed over it.
    When the write fails (a full disk) the temporary goes, `path` is as it was, and WriteError
    says so in one line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write ({e.strerror}); the earlier file is "
                         "untouched") from None


def command(main):
    """Decorate an entry point `main(argv=None) -> int` so that an InputError raised anywhere in
    it (a bad flag included) prints `error: MESSAGE` as one line on stderr and returns its
    status (2; 1 for a WriteError)."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except InputError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return e.status

    return run


def say(message: str) -> None:
    """One line of progress or warning on stderr, flushed (stdout carries results)."""
    print(message, file=sys.stderr, flush=True)


def silent(message: str) -> None:
    """`say` for a quiet run: nothing."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `timeout`'s stop), raised where Ctrl-C would raise
    KeyboardInterrupt, so that both stop a run the same way: checkpoint kept, resume said."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises `Terminated`; the previous handler comes back after.
    (Only the main thread can set handlers; elsewhere the block changes nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit(status: int) -> None:
    """End a command-line process with `status`. After Ctrl-C or SIGTERM (130, 143) an epoch
    may still be computing in XLA's threads, and tearing the interpreter down under it can
    crash (a segfault instead of the status): such a process ends at once, its output flushed
    (checkpoints are written synchronously, and the kernel releases its locks)."""
    if status in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
