"""The Python API: run a sweep and read its results back, for notebooks and scripts.

    import uspsjax
    run = uspsjax.run("lr", networks=["fc"], epochs=2, seeds=2, out="/tmp/example")
    run.curves("test_acc", network="fc", lr=0.001)       # [members, epochs]
    run.summary()                                          # the summary.md table, as rows
    uspsjax.load("/tmp/example/lr")                        # the same `Run` from metrics.h5

`run` is the command line (`python -m uspsjax.sweep`) called with these settings: the same
checks, progress, locks, checkpoints, resume and atomic results, but bad input raises
`InputError` instead of printing a line.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uspsjax.errors import InputError


@dataclass(frozen=True)
class Run:
    """One sweep's results, numpy only: what `metrics.h5` holds (README, "metrics.h5").

    `record` has every key of the file: `settings` (a dict of settings per member: network,
    seed, bag, label, group and every static and dynamic setting), `curves` float32
    [member, epoch, metric] with the metric names in `metrics`, `diverged` (1-based epoch, 0 if
    never), `test_probs` [member, sample, class], `y_test`, `robust` [member, attack, eps] or
    None, `groups` (per static group: label, members, wall time, chunks, device, versions), and
    the provenance (`device`, `versions`, `data_sha256`, `sweep_text`, `overrides`, `shards`).
    """

    path: Path
    record: dict

    def __getattr__(self, key):
        try:
            return self.__dict__["record"][key]
        except KeyError:
            raise AttributeError(key) from None

    def members(self, network: str | None = None, **settings) -> np.ndarray:
        """Indices of the members of `network` (any, if None) whose settings equal `settings`
        by value (`lr=1e-3` matches however the sweep file spelled it)."""
        from uspsjax import results
        rows = self.record["settings"]
        for key in settings:
            if rows and key not in rows[0]:
                raise InputError(f"{self.path}: no setting {key!r} (known: "
                                 f"{', '.join(rows[0])})")
        return np.array([i for i, s in enumerate(rows)
                         if (network is None or s["network"] == network)
                         and all(results.same_value(s[k], v) for k, v in settings.items())],
                        dtype=int)

    def curves(self, metric: str, network: str | None = None, **settings) -> np.ndarray:
        """One metric's curves `[member, epoch]` of the members `members(network, **settings)`
        selects (NaN past a member's epochs or its divergence)."""
        if metric not in self.record["metrics"]:
            raise InputError(f"{self.path}: no metric {metric!r} (known: "
                             f"{', '.join(self.record['metrics'])})")
        column = list(self.record["metrics"]).index(metric)
        return self.record["curves"][self.members(network, **settings), :, column]

    def summary(self) -> list[dict]:
        """The summary table: a row per (network, setting) with the final epoch's mean and
        sample std over seeds (`results.summarize`)."""
        from uspsjax import results
        return results.summarize(self.record)

    def ensembles(self) -> list[dict]:
        """Bagging ensembles, single member against k members (`results.ensemble_table`);
        empty for a sweep without ensembles."""
        from uspsjax import results
        return results.ensemble_table(self.record)

    def figures(self, folder) -> list[Path]:
        """Draw the figures (accuracy, loss, bagging and robustness where they apply) into
        `folder`; returns their paths."""
        from uspsjax import results
        Path(folder).mkdir(parents=True, exist_ok=True)
        return results.write_figures(self.record, Path(folder))


def load(folder) -> Run:
    """The `Run` in a result folder (`results/NAME`, or its `metrics.h5`); InputError when
    there is none or it cannot be read."""
    from uspsjax import results
    path = Path(folder)
    path = path / "metrics.h5" if path.is_dir() else path
    try:
        return Run(path.parent, results.read_metrics(path))
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
