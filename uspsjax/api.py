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

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from uspsjax.errors import InputError


@dataclass(frozen=True)
class Run:
    """One sweep's results, numpy only: what `metrics.h5` holds (README, "metrics.h5"), one
    field per record (`load` builds it; `record` keeps them as the dict `results` reads)."""

    path: Path                   # the result folder
    name: str                    # the sweep's name (its folder's name)
    description: str
    sweep_text: str              # the sweep file as it ran
    overrides: dict              # --networks, --epochs, --seeds, --dtype; a merge's record
    study: dict                  # the study's own numbers, per network
    metrics: tuple[str, ...]     # the names of the curves' last axis
    settings: list[dict]         # per member: network, seed, bag, label, group, every setting
    curves: np.ndarray           # float32 [member, epoch, metric]; NaN past a member's epochs
    diverged: np.ndarray         # int32 [member]: the 1-based epoch it diverged in, 0 if never
    test_probs: np.ndarray       # float32 [member, sample, class], float16-rounded softmax
    y_test: np.ndarray           # int32 [sample]
    robust: np.ndarray | None    # float32 [member, attack, eps] (attacks.ATTACKS), or None
    attack_eps: list[float]
    ensemble: int                # the bagging ensemble's size, 0 without one
    n_train: int | None          # training images (None: recorded before it was)
    validation: int              # training images held out for validation
    validation_seed: int
    groups: list[dict]           # per static group: label, members, wall time, chunks, device
    programs: int                # compiled training programs (static groups)
    device: str                  # where it ran (a CPU named by model, ISA, cores, caches)
    versions: dict               # uspsjax, its source digest, jax, jaxlib, flax, optax, ...
    data_sha256: str | None      # the data's content hash (None: recorded before it was)
    shard: dict | None           # a shard's record: index, count, members, total
    shards: dict | None          # a gathered run's record of its shards
    wall_time_s: float
    created: str                 # ISO time of writing
    schema_version: int
    record: dict = field(repr=False, compare=False)

    @classmethod
    def of(cls, path: Path, record: dict) -> "Run":
        """The Run of a result folder's `record` (`results.read_metrics`)."""
        return cls(path=path, record=record,
                   **{f.name: record[f.name] for f in fields(cls) if f.name not in ("path",
                                                                                    "record")})

    def members(self, network: str | None = None, **settings) -> np.ndarray:
        """Indices of the members of `network` (any, if None) whose settings equal `settings`
        by value (`lr=1e-3` matches however the sweep file spelled it)."""
        from uspsjax import results
        rows = self.settings
        for key in settings:
            if rows and key not in rows[0]:
                raise InputError(f"{self.path}: no setting {key!r} (known: "
                                 f"{', '.join(rows[0])})")
        return np.array([i for i, s in enumerate(rows)
                         if (network is None or s["network"] == network)
                         and all(results.same_value(s[k], v) for k, v in settings.items())],
                        dtype=int)

    def curve(self, metric: str, network: str | None = None, **settings) -> np.ndarray:
        """One metric's curves `[member, epoch]` (a column of `curves`) of the members
        `members(network, **settings)` selects (NaN past a member's epochs or its divergence)."""
        if metric not in self.metrics:
            raise InputError(f"{self.path}: no metric {metric!r} (known: "
                             f"{', '.join(self.metrics)})")
        column = list(self.metrics).index(metric)
        return self.curves[self.members(network, **settings), :, column]

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
        return Run.of(path.parent, results.read_metrics(path))
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
