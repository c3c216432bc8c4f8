"""The Python API: run a sweep and read its results back, for notebooks and scripts.

    import uspsjax
    run = uspsjax.run("lr", networks=["fc"], epochs=2, seeds=2, out="/tmp/example")
    run.curve("test_acc", network="fc", lr=0.001)        # [members, epochs]
    run.summary()                                          # the summary.md table, as rows
    uspsjax.load("/tmp/example/lr")                        # the same `Run` from metrics.h5

`run` and the command line (`python -m uspsjax.sweep`) are two ways to fill in one
`sweep.Options` and run it with `sweep.execute`: the same checks, progress, locks,
checkpoints, resume and atomic results, but bad input raises `InputError` instead of printing
a line.
"""

from dataclasses import fields
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


def run(sweep, **options) -> Run:
    """Train the sweep `sweep` (a shipped name such as "lr", or a path to a TOML file) and
    return the `Run` it wrote (under `out`: NAME, NAME.lower-scale, or a shard's folder for
    `shard="I/N"`).

    `options` are those of `python -m uspsjax.sweep`, by the names of `sweep.Options` (its
    flags without the dashes, `-` as `_`): `networks=["fc", "cnn"]`, `epochs`, `seeds`,
    `dtype`, `data`, `out="results"`, `checkpoints="checkpoints"`, `resume`, `merge`,
    `replace`, `shard`, `no_checkpoints`, `quiet`, `devices`, `placement`, ... The run is the
    command line's own (`sweep.execute`): the same checks, progress, locks, checkpoints,
    resume and atomic results.

    InputError for bad input (an unknown option included), before anything trains;
    `errors.WriteError` (an InputError) when a checkpoint could not be written as it trained
    (a full disk: the epochs before it kept); RuntimeError when the run stopped without a
    result (its result could not be written, Ctrl-C or SIGTERM: its message says how to go
    on)."""
    from uspsjax import sweep as sweep_mod
    known = [f.name for f in fields(sweep_mod.Options) if f.name != "sweep"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(f"uspsjax.run: unknown option {unknown[0]!r} (known: "
                         f"{', '.join(known)})")
    if str(sweep) == "all":
        raise InputError("uspsjax.run takes one sweep; call it once per sweep for 'all'")
    status, written = sweep_mod.execute(sweep_mod.Options(sweep=str(sweep), **options))
    if status or not written:
        raise RuntimeError(f"the sweep stopped without a result (status {status})")
    return load(written[-1])
