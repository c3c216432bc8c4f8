"""The Python API: run a sweep and read its results back, for notebooks and scripts.

    import uspsjax
    run = uspsjax.run("lr", networks=["fc"], epochs=2, seeds=2, out="/tmp/example")
    run.curve("test_acc", network="fc", lr=0.001)        # [members, epochs]
    run.summary()                                          # the summary.md table, as rows
    uspsjax.load("/tmp/example/lr")                        # the same `Run` from metrics.h5

`run` is the command line (`python -m uspsjax.sweep`) called with these settings: the same
checks, progress, locks, checkpoints, resume and atomic results, but bad input raises
`InputError` instead of printing a line.
"""

from pathlib import Path

from uspsjax import results
from uspsjax.errors import InputError
from uspsjax.results import Run


def load(folder) -> Run:
    """The `Run` in a result folder (`results/NAME`, or its `metrics.h5`); InputError when
    there is none or it cannot be read."""
    path = Path(folder)
    path = path / "metrics.h5" if path.is_dir() else path
    try:
        return results.read_metrics(path)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: not a readable uspsjax result "
                         f"({' '.join(str(e).split())})") from None


def run(sweep, *, networks: list[str] | None = None, epochs: int | None = None,
        seeds: int | None = None, dtype: str | None = None, data=None, out="results",
        checkpoints="checkpoints", resume: bool = False, merge: bool = False,
        replace: bool = False, shard: str | None = None, no_checkpoints: bool = False,
        quiet: bool = False) -> Run:
    """Train the sweep `sweep` (a shipped name such as "lr", or a path to a TOML file) as
    `python -m uspsjax.sweep` does with the matching flags, and return the `Run` it wrote
    (under `out`: NAME, NAME.lower-scale, or a shard's folder for `shard="I/N"`).

    InputError for bad input, before anything trains; RuntimeError when the run stopped
    without a result (a failed write, Ctrl-C or SIGTERM: its message says how to go on)."""
    from uspsjax import sweep as sweep_mod
    if str(sweep) == "all":
        raise InputError("uspsjax.run takes one sweep; call it once per sweep for 'all'")
    argv = [str(sweep), "--out", str(out), "--checkpoints", str(checkpoints)]
    for flag, value in (("--networks", ",".join(networks) if networks else None),
                        ("--epochs", epochs), ("--seeds", seeds), ("--dtype", dtype),
                        ("--data", data), ("--shard", shard)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--resume", resume), ("--merge", merge), ("--replace", replace),
                     ("--no-checkpoints", no_checkpoints), ("--quiet", quiet)):
        if on:
            argv.append(flag)
    status, written = sweep_mod.execute(argv)
    if status or not written:
        raise RuntimeError(f"the sweep stopped without a result (status {status})")
    return load(written[-1])
