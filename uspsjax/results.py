"""Write and read one sweep's results: `OUT/NAME/metrics.h5`, `summary.md` and PNG figures.

numpy, h5py and matplotlib; the names of the networks and attacks come from `models` and
`attacks` (importing them loads JAX, which nothing here runs). A sweep's results are a `Run`
(built by the sweep module, written by `write_results`); `read_metrics` turns metrics.h5 back
into the same `Run`, so summaries and figures can be regenerated from the file alone. Model
parameters are never written.

metrics.h5 (schema_version 1; M members, E epochs, N test samples, A attacks, P eps values):

| path           | type                   | content                                                |
|----------------|------------------------|--------------------------------------------------------|
| `curves`       | float32 [M, E, metric] | per-epoch metrics, NaN past a member's epochs or       |
|                |                        | its divergence; attribute `metrics` = metric names     |
|                |                        | (`val_loss`, `val_acc` too with a validation split)    |
| `diverged`     | int32 [M]              | 1-based epoch in which the member diverged, 0 if never |
| `test_probs`   | float16 [M, N, 10]     | final softmax on the test set (float16 to stay small)  |
| `y_test`       | int32 [N]              | test labels                                            |
| `robust`       | float32 [M, A, P]      | accuracy under attack; attributes `attacks` =          |
|                |                        | ("fgsm", "pgd20") and `eps`; only if attacks ran       |
| `settings/KEY` | [M], one per key       | str: UTF-8 variable-length string, int: int64,         |
|                |                        | float: float64, bool: bool (a column mixing int and    |
|                |                        | float is float64 with a bool attribute `int_mask`)     |
| `groups/KEY`   | [G], one per key       | per static group: `label` str, `members` int64,        |
|                |                        | `wall_time_s` float64, `chunks` int64, `device` str,   |
|                |                        | `versions` str (JSON); the last two absent from files  |
|                |                        | written before them, read back as the root's           |
| attributes     | on the root            | `name`, `description`, `sweep_text`, `overrides`       |
|                |                        | (JSON), `study` (JSON), `device`, `versions` (JSON),   |
|                |                        | `wall_time_s`, `programs`, `ensemble`, `attack_eps`,   |
|                |                        | `n_train` (training images; absent from files written  |
|                |                        | before it, read back as None), `validation` and        |
|                |                        | `validation_seed` (images held out from training and   |
|                |                        | their seed; 0 when absent), `data_sha256`, `shard`     |
|                |                        | and `shards` (JSON, where they apply; else read back   |
|                |                        | as None: `OPTIONAL_RECORDS`), `created` (ISO time),    |
|                |                        | `schema_version` = 1                                   |

Large datasets are gzip-compressed.

Statistics are over seeds: mean and sample std (ddof=1) of the final epoch, over members
that did not diverge.
"""

import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from uspsjax.attacks import ATTACKS
from uspsjax.errors import InputError
from uspsjax.models import NETWORKS

SCHEMA_VERSION = 1
ATTACK_TITLES = {"fgsm": "FGSM", "pgd20": "PGD-20"}
# Root attributes (JSON) that only some results have: the data's SHA-256 (`data.content_hash`),
# a shard's record (`--shard`) and a gathered result's split (`--gather`); None when absent.
OPTIONAL_RECORDS = ("data_sha256", "shard", "shards")
# What `write_results` puts in a result folder: a folder holding anything else is not its own.
RESULT_FILES = ("metrics.h5", "summary.md", "accuracy.png", "loss.png", "bagging.png",
                "robust.png")
DPI = 100
_GZIP = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


@dataclass(frozen=True)
class Run:
    """One sweep's results, numpy only: what `run_sweep` returns, `write_metrics` writes and
    `read_metrics` reads back, one field per record of metrics.h5 (the table above)."""

    name: str                    # the sweep's name (its folder's name)
    description: str
    sweep_text: str              # the sweep file as it ran
    overrides: dict              # --networks, --epochs, --seeds, --dtype; a merge's record
    study: dict                  # the study's own numbers, per network
    metrics: tuple[str, ...]     # the names of the curves' last axis
    settings: list[dict]         # per member: network, seed, bag, label, group, every setting
    curves: np.ndarray           # float32 [member, epoch, metric]; NaN past a member's epochs
    diverged: np.ndarray         # int32 [member]: the 1-based epoch it diverged in, 0 if never
    test_probs: np.ndarray       # float32 [member, sample, class], float16-rounded when read
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
    wall_time_s: float
    data_sha256: str | None = None  # the data's content hash (None: recorded before it was)
    shard: dict | None = None    # a shard's record: index, count, members, total
    shards: dict | None = None   # a gathered run's record of its shards
    created: str | None = None   # ISO time of writing (None: not written yet)
    schema_version: int = SCHEMA_VERSION
    path: Path | None = None     # the result folder it was read from (None: not read)

    def members(self, network: str | None = None, **settings) -> np.ndarray:
        """Indices of the members of `network` (any, if None) whose settings equal `settings`
        by value (`lr=1e-3` matches however the sweep file spelled it)."""
        rows = self.settings
        for key in settings:
            if rows and key not in rows[0]:
                raise InputError(f"{self.path or self.name}: no setting {key!r} (known: "
                                 f"{', '.join(rows[0])})")
        return np.array([i for i, s in enumerate(rows)
                         if (network is None or s["network"] == network)
                         and all(same_value(s[k], v) for k, v in settings.items())],
                        dtype=int)

    def curve(self, metric: str, network: str | None = None, **settings) -> np.ndarray:
        """One metric's curves `[member, epoch]` (a column of `curves`) of the members
        `members(network, **settings)` selects (NaN past a member's epochs or its divergence)."""
        if metric not in self.metrics:
            raise InputError(f"{self.path or self.name}: no metric {metric!r} (known: "
                             f"{', '.join(self.metrics)})")
        column = list(self.metrics).index(metric)
        return self.curves[self.members(network, **settings), :, column]

    def summary(self) -> list[dict]:
        """The summary table: a row per (network, setting) with the final epoch's mean and
        sample std over seeds (`summarize`)."""
        return summarize(self)

    def ensembles(self) -> list[dict]:
        """Bagging ensembles, single member against k members (`ensemble_table`); empty for a
        sweep without ensembles."""
        return ensemble_table(self)

    def figures(self, folder) -> list[Path]:
        """Draw the figures (accuracy, loss, bagging and robustness where they apply) into
        `folder`; returns their paths."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        return write_figures(self, Path(folder))



# ---------------------------------------------------------------- metrics.h5

def write_metrics(path: Path, run: Run) -> None:
    """Write `run` to the HDF5 file `path` in the schema of the module docstring."""
    with h5py.File(path, "w") as f:
        curves = f.create_dataset("curves", data=np.asarray(run.curves, np.float32),
                                  **_GZIP)
        curves.attrs["metrics"] = list(run.metrics)
        f.create_dataset("diverged", data=np.asarray(run.diverged, np.int32))
        f.create_dataset("test_probs", data=np.asarray(run.test_probs, np.float16),
                         **_GZIP)
        f.create_dataset("y_test", data=np.asarray(run.y_test, np.int32), **_GZIP)
        if run.robust is not None:
            robust = f.create_dataset("robust", data=np.asarray(run.robust, np.float32))
            robust.attrs["attacks"] = list(ATTACKS)
            robust.attrs["eps"] = np.asarray(run.attack_eps, np.float64)
        # track_order keeps the keys in the sweep's order instead of h5py's alphabetical one.
        settings = f.create_group("settings", track_order=True)
        keys = list(run.settings[0]) if run.settings else []
        if any(set(s) != set(keys) for s in run.settings):
            raise ValueError("every member's settings must have the same keys")
        for key in keys:
            _write_column(settings, key, [s[key] for s in run.settings])
        groups = f.create_group("groups", track_order=True)
        kinds = (("label", str), ("members", int), ("wall_time_s", float), ("chunks", int),
                 ("device", str), ("versions", str), ("recorded", bool))
        for key, kind in kinds:
            _write_column(groups, key, [kind(_group_value(run, g, key)) for g in run.groups])
        a = f.attrs
        for key in ("name", "description", "sweep_text", "device"):
            a[key] = str(getattr(run, key))
        for key in ("overrides", "study", "versions"):
            a[key] = json.dumps(getattr(run, key))
        for key in OPTIONAL_RECORDS:  # JSON, present only where they apply
            if getattr(run, key) is not None:
                a[key] = json.dumps(getattr(run, key))
        a["wall_time_s"] = float(run.wall_time_s)
        a["programs"] = int(run.programs)
        a["ensemble"] = int(run.ensemble)
        a["n_train"] = int(run.n_train)
        a["validation"] = int(run.validation)
        a["validation_seed"] = int(run.validation_seed)
        a["attack_eps"] = np.asarray(run.attack_eps, np.float64)
        a["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        a["schema_version"] = SCHEMA_VERSION


def _group_value(run: Run, group: dict, key: str):
    # A group's device and versions default to the run's; None (not recorded: a group kept
    # from an older merged file) is stored as "" and JSON null. Versions are JSON text.
    # `recorded`: whether they are the values of the run that trained the group (False where
    # a group does not say).
    value = group.get(key, getattr(run, key) if key in ("device", "versions") else None)
    if key == "versions":
        return json.dumps(value, sort_keys=True)
    return "" if value is None and key == "device" else value


def _write_column(group, key, values):
    # One typed dataset per key; the type is what lets read_metrics restore the python values.
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    kinds = {type(v) for v in values}
    if kinds <= {str}:
        group.create_dataset(key, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
    elif kinds <= {bool}:
        group.create_dataset(key, data=np.array(values, dtype=bool))
    elif kinds <= {int}:
        group.create_dataset(key, data=np.array(values, dtype=np.int64))
    elif kinds <= {int, float}:
        # A TOML list such as [1e-6, 1e-3, 50] mixes ints and floats; remember which were ints.
        ds = group.create_dataset(key, data=np.array(values, dtype=np.float64))
        ds.attrs["int_mask"] = np.array([type(v) is int for v in values])
    else:
        names = sorted(k.__name__ for k in kinds)
        raise TypeError(f"settings column {key!r}: unsupported value types {names}")


def _read_column(ds) -> list:
    if h5py.check_string_dtype(ds.dtype):
        return [str(v) for v in ds.asstr()[()]]
    values = ds[()].tolist()  # numpy scalars -> python bool/int/float
    if "int_mask" in ds.attrs:
        values = [int(v) if m else v for v, m in zip(values, ds.attrs["int_mask"])]
    return values


def read_metrics(path: Path) -> Run:
    """Read metrics.h5 back into the `Run` that wrote it, with `created` (ISO time) and `path`
    (the folder it is in) set.

    Arrays come back with the run's dtypes; `test_probs` is float32 holding float16-rounded
    values.
    """
    with h5py.File(path, "r") as f:
        a = f.attrs
        if int(a["schema_version"]) != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema_version {a['schema_version']}, "
                             f"this code reads {SCHEMA_VERSION}")
        r = {k: str(a[k]) for k in ("name", "description", "sweep_text", "device", "created")}
        r.update({k: json.loads(a[k]) for k in ("overrides", "study", "versions")})
        r.update({k: json.loads(a[k]) if k in a else None for k in OPTIONAL_RECORDS})
        r.update({k: int(a[k]) for k in ("programs", "ensemble", "schema_version")})
        r["wall_time_s"] = float(a["wall_time_s"])
        r["n_train"] = int(a["n_train"]) if "n_train" in a else None
        r["validation"] = int(a.get("validation", 0))
        r["validation_seed"] = int(a.get("validation_seed", 0))
        r["attack_eps"] = [float(e) for e in a["attack_eps"]]
        r["metrics"] = tuple(str(m) for m in f["curves"].attrs["metrics"])
        for key in ("curves", "diverged", "y_test"):
            r[key] = f[key][()]
        r["test_probs"] = f["test_probs"][()].astype(np.float32)
        r["robust"] = f["robust"][()] if "robust" in f else None
        columns = {k: _read_column(ds) for k, ds in f["settings"].items()}
        r["settings"] = [{k: c[i] for k, c in columns.items()} for i in range(len(r["diverged"]))]
        groups = {k: _read_column(ds) for k, ds in f["groups"].items()}
        r["groups"] = [dict(zip(groups, row)) for row in zip(*groups.values())]
    # Files from before per-group records: a group ran on the file's (newest) device with its
    # versions, unless a merge kept it from an earlier run (then: not recorded, None). Files
    # from before the `recorded` mark: a kept group's values may be another run's (some merges
    # wrote the file's own values for every group), so only the newest run's groups count as
    # recorded.
    kept = r["overrides"].get("merged", {}).get("networks", [])
    for g in r["groups"]:
        earlier = g["label"].split()[0] in kept
        g["recorded"] = bool(g.get("recorded", not earlier))
        if "device" not in g:
            g["device"] = None if earlier else r["device"].split("; ")[-1]
        g["device"] = g["device"] or None
        g["versions"] = (json.loads(g["versions"]) if "versions" in g
                         else None if earlier else r["versions"])
    return Run(**r, path=Path(path).parent)


# ---------------------------------------------------------------- statistics

def _networks(settings) -> list[str]:
    # The networks of `models.NETWORKS` in its order, then any other (a file from a newer
    # version) in order of appearance.
    seen = list(dict.fromkeys(s["network"] for s in settings))
    return [n for n in NETWORKS if n in seen] + [n for n in seen if n not in NETWORKS]


def same_value(a, b) -> bool:
    """Whether two setting values are equal by value: numbers within a relative 1e-9 where either
    is a float (0.001, 1e-3 and 1.0e-3 alike; 50 and 50.0 alike), anything else (ints, strings,
    bools) exactly and only to a value of its own type (True is not 1)."""
    a, b = (x.item() if isinstance(x, np.generic) else x for x in (a, b))
    kinds = {type(a), type(b)}
    if kinds <= {int, float} and float in kinds:
        return math.isclose(a, b, rel_tol=1e-9)
    return len(kinds) == 1 and a == b


def _settings_groups(run) -> list[tuple[str, str, np.ndarray]]:
    """(network, label, member indices) in table order."""
    out = []
    for net in _networks(run.settings):
        members = [i for i, s in enumerate(run.settings) if s["network"] == net]
        for label in dict.fromkeys(run.settings[i]["label"] for i in members):
            idx = [i for i in members if run.settings[i]["label"] == label]
            out.append((net, label, np.array(idx, dtype=int)))
    return out


def _final(curves: np.ndarray) -> np.ndarray:
    """Per member, the metrics of its last epoch with all metrics finite (NaN row if none)."""
    ok = np.isfinite(curves).all(axis=2)
    last = curves.shape[1] - 1 - np.argmax(ok[:, ::-1], axis=1)
    final = curves[np.arange(len(curves)), last].astype(np.float64)
    final[~ok.any(axis=1)] = np.nan
    return final


def _mean_std(x) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return float("nan"), float("nan")
    # The sample std (ddof=1) estimates the spread of a new seed; one value has no spread.
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def summarize(run: Run) -> list[dict]:
    """One row per (network, label) with the final-epoch statistics over seeds.

    Row keys: network, label, n, n_diverged, diverged_epochs (sorted list), `<metric>_mean` and
    `<metric>_std` for each metric, loss_gap_mean/std (test - train loss per member), and
    study_test_acc / study_test_loss (None when the study gives no number for the network).
    Means and sample stds (ddof=1) are over non-diverged members; final = last finite epoch.
    """
    metrics = list(run.metrics)
    final = _final(run.curves)
    gap = final[:, metrics.index("test_loss")] - final[:, metrics.index("train_loss")]
    diverged = np.asarray(run.diverged)
    rows = []
    for net, label, idx in _settings_groups(run):
        ok = idx[diverged[idx] == 0]
        row = {"network": net, "label": label, "n": len(idx), "n_diverged": len(idx) - len(ok),
               "diverged_epochs": sorted(int(d) for d in diverged[idx] if d)}
        for j, m in enumerate(metrics):
            row[f"{m}_mean"], row[f"{m}_std"] = _mean_std(final[ok, j])
        row["loss_gap_mean"], row["loss_gap_std"] = _mean_std(gap[ok])
        study = run.study.get(net, {})
        row["study_test_acc"] = study.get("test_acc")
        row["study_test_loss"] = study.get("test_loss")
        rows.append(row)
    return rows


def ensemble_accuracy(probs: np.ndarray, y: np.ndarray, keep: np.ndarray) -> float:
    """Accuracy of the argmax of the kept members' mean softmax; probs (m, N, 10), keep (m,) bool.

    NaN if no member is kept (a diverged member's NaN softmax must never reach the mean).
    """
    keep = np.asarray(keep, bool)
    if not keep.any():
        return float("nan")
    mean = np.asarray(probs, np.float64)[keep].mean(axis=0)
    return float(np.mean(mean.argmax(axis=-1) == np.asarray(y)))


def ensemble_table(run: Run) -> list[dict]:
    """Ensembles: per (network, label) and k = 1..K, single-member and k-member ensemble accuracy.

    Members sharing (network, label, seed) with bag = 1..K form one ensemble (K: the largest bag
    of that network, which a sweep's `[cpu]` table may set below its ensemble size); seeds are
    independent ensembles. Row keys: network, label, k, single_mean/std (the bag=k members),
    ensemble_mean/std (bags 1..k, diverged ones left out), left_out (diverged members left out,
    summed over seeds), n_members (members considered, summed over seeds). Empty if not bagging.
    """
    settings, probs, y = run.settings, run.test_probs, run.y_test
    diverged = np.asarray(run.diverged)
    rows = []
    for net, label, idx in _settings_groups(run) if run.ensemble else []:
        seeds = list(dict.fromkeys(settings[i]["seed"] for i in idx))
        for k in range(1, max(settings[i]["bag"] for i in idx) + 1):
            single, ensemble, left_out, n_members = [], [], 0, 0
            for seed in seeds:
                bags = {settings[i]["bag"]: i for i in idx if settings[i]["seed"] == seed}
                if k in bags and not diverged[bags[k]]:
                    single.append(ensemble_accuracy(probs[[bags[k]]], y, [True]))
                members = [bags[b] for b in range(1, k + 1) if b in bags]
                keep = diverged[members] == 0
                ensemble.append(ensemble_accuracy(probs[members], y, keep))
                left_out += int((~keep).sum())
                n_members += len(members)
            row = {"network": net, "label": label, "k": k, "left_out": left_out,
                   "n_members": n_members}
            row["single_mean"], row["single_std"] = _mean_std(single)
            row["ensemble_mean"], row["ensemble_std"] = _mean_std(ensemble)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- summary.md

def _pct(mean, std) -> str:
    return "—" if np.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _num(mean, std) -> str:
    return "—" if np.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *map(line, rows), ""]


def merge_origin(overrides: dict, device: str, net: str) -> tuple[str, dict, bool]:
    """(the device `net`'s members ran on, the overrides they ran with, whether a `--merge` kept
    them from an earlier run) for a run with `overrides` on `device`.

    Follows the chain of merge records: `overrides["merged"]` names the networks kept from the
    earlier run, that run's device and its overrides (which may hold its own merge record). A
    merged run's device is its devices joined with "; ", the newest (its own run's) last."""
    kept = False
    while (merged := overrides.get("merged")) and net in merged["networks"]:
        device, overrides, kept = merged["device"], merged["overrides"], True
    own = {k: v for k, v in overrides.items() if k != "merged"}
    return (device.split("; ")[-1] if "merged" in overrides else device), own, kept


def describe_overrides(overrides: dict) -> str:
    """Command-line overrides as `key=value` text; a merge names the networks it kept, each with
    the device and overrides of the run that trained it (the earlier sweep text stays in
    metrics.h5 only)."""
    parts = [f"{k}={v}" for k, v in overrides.items() if k != "merged"]
    if "merged" in overrides:
        origins = {}
        for net in overrides["merged"]["networks"]:
            device, own, _ = merge_origin(overrides, "", net)
            origins.setdefault((device, describe_overrides(own)), []).append(net)
        parts.append("merged with the earlier " + " and ".join(
            f"{', '.join(nets)} members from {device}" + (f" (overrides {text})" if text else "")
            for (device, text), nets in origins.items()))
    return ", ".join(parts)


def summary_markdown(run: Run) -> str:
    """The text of summary.md: deterministic (no timestamps), so regeneration is byte-identical."""
    description = run.description.strip()
    lines = [f"# Sweep {run.name}", "", *([description, ""] if description else []),
             f"Device: {run.device}; wall time {run.wall_time_s:.1f} s; "
             f"{run.programs} programs; {len(run.settings)} members."]
    if run.overrides:
        lines.append(f"Overrides: {describe_overrides(run.overrides)}.")
    if run.shard:
        shard = run.shard
        lines.append(f"Shard {shard['index']} of {shard['count']}: {len(shard['members'])} of "
                     f"the sweep's {shard['total']} members (`--gather` combines the shards).")
    if run.shards:
        walls = ", ".join(f"{w:.0f}" for w in run.shards["wall_time_s"])
        lines.append(f"Gathered from {run.shards['count']} shards (wall times {walls} s).")
    if run.validation:
        lines.append(f"Validation: {run.validation} training images held out (seed "
                     f"{run.validation_seed}, the same for every member); select on it, "
                     "report test.")
    lines += ["Final epoch, mean ± std (sample, ddof=1) over seeds of members that did not "
              "diverge.", ""]
    splits = ["train", "val", "test"] if "val_acc" in run.metrics else ["train", "test"]
    rows = []
    for r in summarize(run):
        n, bad = r["n"], r["n_diverged"]
        if bad == n:
            row = [r["network"], r["label"], str(n), f"diverged ({n}/{n})"]
            row += ["—"] * (2 * len(splits))
        else:
            row = [r["network"], r["label"], f"{n} ({bad}/{n} diverged)" if bad else str(n)]
            row += [_pct(r[f"{s}_acc_mean"], r[f"{s}_acc_std"]) for s in splits]
            row += [_num(r[f"{s}_loss_mean"], r[f"{s}_loss_std"]) for s in splits]
            row += [_num(r["loss_gap_mean"], r["loss_gap_std"])]
        study = r["study_test_acc"]
        rows.append(row + ["—" if study is None else f"{100 * study:.2f}"])
    lines += _table(["network", "setting", "seeds", *(f"{s} acc" for s in splits),
                     *(f"{s} loss" for s in splits), "test−train loss", "study"], rows)
    if run.ensemble:
        lines += ["## Bagging ensembles", "",
                  "Test accuracy (%) over seeds; left out = diverged members of all ensembles.", ""]
        rows = [[r["network"], r["label"], r["k"], _pct(r["single_mean"], r["single_std"]),
                 _pct(r["ensemble_mean"], r["ensemble_std"]), f"{r['left_out']}/{r['n_members']}"]
                for r in ensemble_table(run)]
        lines += _table(["network", "setting", "k", "single acc", "ensemble acc", "left out"], rows)
    if run.robust is not None and len(run.attack_eps):
        lines += ["## Accuracy under attack", "",
                  "Test accuracy (%) over seeds of members that did not diverge.", ""]
        clean = _final(run.curves)[:, list(run.metrics).index("test_acc")]
        header = ["network", "setting", "clean"] + [
            f"{ATTACK_TITLES[a]}@{e:g}" for a in ATTACKS for e in run.attack_eps]
        robust = np.asarray(run.robust, np.float64)
        rows = []
        for net, label, idx in _settings_groups(run):
            ok = idx[np.asarray(run.diverged)[idx] == 0]
            if len(ok):
                columns = robust[ok].reshape(len(ok), -1).T  # attack-major, as in the header
                rows.append([net, label, _pct(*_mean_std(clean[ok]))]
                            + [_pct(*_mean_std(c)) for c in columns])
            else:
                rows.append([net, label, f"diverged ({len(idx)}/{len(idx)})"]
                            + ["—"] * (len(header) - 3))
        lines += _table(header, rows)
    return "\n".join(lines)


# ---------------------------------------------------------------- figures

def _band(ys: np.ndarray):
    """Mean, min and max over members per epoch, NaN where no member has a value (no warnings)."""
    ok = np.isfinite(ys)
    count = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, ys, 0).sum(axis=0) / count
    lo = np.where(ok, ys, np.inf).min(axis=0)
    hi = np.where(ok, ys, -np.inf).max(axis=0)
    empty = count == 0
    return np.where(empty, np.nan, mean), np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


# The space around each panel, in inches: tick labels and a y label on the left, tick labels and
# an x label below, the title above. Fixed rather than measured (`tight_layout` measures every
# text, a third of a figure's drawing time), and the same in every figure of a kind.
MARGINS = {"left": 0.8, "right": 0.15, "bottom": 0.5, "top": 0.35}


def _panels(rows: int, cols: int, width: float, height: float):
    """A figure of rows x cols panels, each `width` x `height` inches with its margins."""
    # Figure without pyplot: nothing is registered globally, so a failed plot leaks nothing.
    fig = Figure(figsize=(width * cols, height * rows), dpi=DPI)
    left, right, bottom, top = (MARGINS[k] for k in ("left", "right", "bottom", "top"))
    axes_w, axes_h = width - left - right, height - bottom - top
    fig.subplots_adjust(left=left / (width * cols), right=1 - right / (width * cols),
                        bottom=bottom / (height * rows), top=1 - top / (height * rows),
                        wspace=(left + right) / axes_w, hspace=(bottom + top) / axes_h)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, axes, path: Path, integer_x: bool = True) -> None:
    for ax in axes.flat:
        if integer_x:  # epochs and k are whole numbers; no "1.5 epochs" ticks
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:  # an empty legend only draws a warning
            ax.legend(fontsize=7)
    fig.savefig(path)


def _plot_curves(run: Run, kind: str, path: Path) -> None:
    """accuracy.png / loss.png: rows train, validation (when held out) and test, a column per
    network, a line per label."""
    nets, metrics = _networks(run.settings), list(run.metrics)
    splits = ("train", "val", "test") if "val_acc" in metrics else ("train", "test")
    diverged, epochs = np.asarray(run.diverged), np.arange(1, run.curves.shape[1] + 1)
    fig, axes = _panels(len(splits), len(nets), 4.0, 3.3)
    for col, net in enumerate(nets):
        groups = [(label, idx) for n, label, idx in _settings_groups(run) if n == net]
        for row, split in enumerate(splits):
            ax, j = axes[row, col], metrics.index(f"{split}_{kind}")
            for c, (label, idx) in enumerate(groups):
                color, bad = f"C{c % 10}", idx[diverged[idx] > 0]
                if len(bad) == len(idx):  # nothing healthy: show the runs up to divergence
                    first, last = diverged[bad].min(), diverged[bad].max()
                    when = f"{first}–{last}" if last > first else f"{first}"
                    text, shown = f"{label} (diverged at epoch {when})", idx
                else:
                    text = label + (f" ({len(bad)}/{len(idx)} diverged)" if len(bad) else "")
                    shown = idx[diverged[idx] == 0]
                mean, lo, hi = _band(run.curves[shown, :, j])
                ax.plot(epochs, mean, ".-", color=color, label=text)
                ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, linewidth=0)
                for i in bad:  # an x where each diverged member's curve stops
                    seen = np.flatnonzero(np.isfinite(run.curves[i, :, j]))
                    if seen.size:
                        ax.plot(epochs[seen[-1]], run.curves[i, seen[-1], j], "x",
                                color=color, ms=8, mew=2)
            values = run.curves[np.concatenate([idx for _, idx in groups]), :, j]
            if kind == "loss" and np.isfinite(values).any() and np.nanmin(values) > 0:
                ax.set_yscale("log")
            ax.set(title=f"{net}: {split} {kind}", xlabel="epoch")
    _save(fig, axes, path)


def _plot_bagging(run: Run, path: Path) -> None:
    """bagging.png: per network, test accuracy vs members k, single vs ensemble (as the study)."""
    table, nets = ensemble_table(run), _networks(run.settings)
    fig, axes = _panels(1, len(nets), 4.5, 3.5)
    for ax, net in zip(axes[0], nets):
        labels = list(dict.fromkeys(r["label"] for r in table if r["network"] == net))
        for label in labels:
            rows = [r for r in table if r["network"] == net and r["label"] == label]
            for what in ("single", "ensemble"):
                ax.errorbar([r["k"] for r in rows], [r[f"{what}_mean"] for r in rows],
                            yerr=[r[f"{what}_std"] for r in rows], marker="o", capsize=3,
                            label=f"{label} {what}" if len(labels) > 1 else what)
        ax.set(title=net, xlabel="members k", ylabel="test accuracy")
    _save(fig, axes, path)


def _plot_robust(run: Run, path: Path) -> None:
    """robust.png: per network, accuracy vs eps, one line per (label, attack)."""
    nets, eps = _networks(run.settings), np.asarray(run.attack_eps)
    diverged, robust = np.asarray(run.diverged), np.asarray(run.robust, np.float64)
    fig, axes = _panels(1, len(nets), 4.5, 3.5)
    for ax, net in zip(axes[0], nets):
        groups = [(label, idx) for n, label, idx in _settings_groups(run) if n == net]
        for c, (label, idx) in enumerate(groups):
            ok = idx[diverged[idx] == 0]
            for a, (attack, style) in enumerate(zip(ATTACKS, ("-", "--")) if len(ok) else []):
                stats = [_mean_std(robust[ok, a, e]) for e in range(len(eps))]
                ax.errorbar(eps, [m for m, _ in stats], yerr=[s for _, s in stats],
                            color=f"C{c % 10}", linestyle=style, marker="o", capsize=3,
                            label=f"{label} {ATTACK_TITLES[attack]}")
        ax.set(title=net, xlabel="eps", ylabel="accuracy under attack")
    _save(fig, axes, path, integer_x=False)


# ---------------------------------------------------------------- all together

def write_figures(run: Run, folder: Path) -> list[Path]:
    """Draw `run`'s figures into `folder`: accuracy.png, loss.png and, where they apply,
    bagging.png and robust.png. Returns their paths."""
    folder = Path(folder)
    paths = [folder / "accuracy.png", folder / "loss.png"]
    _plot_curves(run, "acc", paths[0])
    _plot_curves(run, "loss", paths[1])
    if run.ensemble:
        paths.append(folder / "bagging.png")
        _plot_bagging(run, paths[-1])
    if run.robust is not None and len(run.attack_eps):
        paths.append(folder / "robust.png")
        _plot_robust(run, paths[-1])
    return paths


def write_results(out_dir: Path, run: Run) -> Path:
    """Write out_dir/NAME/: metrics.h5, summary.md, accuracy.png, loss.png and, when they
    apply, bagging.png and robust.png.

    Atomic as a whole: everything is written into out_dir/.NAME.tmp-<pid> and then swapped in,
    so a failure before the swap leaves an earlier complete result untouched. Returns the folder.
    """
    name = str(run.name)
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise ValueError(f"sweep name {name!r} is not a plain folder name")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tmp, backup = out_dir / f".{name}.tmp-{os.getpid()}", out_dir / f".{name}.old-{os.getpid()}"
    # Summaries are computed from the float16 softmax that is stored, so a later regeneration
    # from metrics.h5 gives the same ensemble accuracies, byte for byte.
    run = replace(run, test_probs=np.asarray(run.test_probs, np.float16).astype(np.float32))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_metrics(tmp / "metrics.h5", run)
        (tmp / "summary.md").write_text(summary_markdown(run), encoding="utf-8")
        write_figures(run, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(backup, ignore_errors=True)
        final.rename(backup)
    try:
        tmp.rename(final)
    except BaseException:
        if backup.exists():
            backup.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return final


def check_replaceable(folder: Path) -> None:
    """InputError unless `folder` is absent or a result folder as `write_results` writes them
    (nothing in it but `RESULT_FILES`): a run replaces only what the engine wrote."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a uspsjax result folder; move it away "
                         "or choose another --out")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in RESULT_FILES)
    if foreign:
        raise InputError(f"{folder}: holds {foreign[0]!r}, which uspsjax did not write; move it "
                         "away or choose another --out (a run replaces the whole folder)")


def merge_runs(old: Run, new: Run, defaults: dict) -> Run:
    """`new` plus the members of `old` (an earlier run of the same sweep) whose networks `new`
    did not train: so one sweep's networks can run on different machines. The caller checks
    that the kept members match the sweep (`sweep.check_mergeable`).

    Settings that `old` lacks (written by an older uspsjax) take `defaults`. Each static group
    keeps the device it ran on; `device` lists every device that contributed.
    """
    ran = {s["network"] for s in new.settings}
    keep = [i for i, s in enumerate(old.settings) if s["network"] not in ran]
    kept_nets = sorted({old.settings[i]["network"] for i in keep})
    old_groups = [dict(g) for g in old.groups if g["label"].split()[0] in kept_nets]
    for g in old_groups:
        g.setdefault("device", old.device)
    new_groups = [{**g, "device": g.get("device", new.device)} for g in new.groups]
    remap = {}
    for i in keep:  # old group numbers -> positions among the kept groups
        remap.setdefault(old.settings[i]["group"], len(remap))
    keys = list(new.settings[0])
    settings = [{k: old.settings[i].get(k, defaults.get(k)) for k in keys} for i in keep]
    for s, i in zip(settings, keep):
        s["group"] = remap[old.settings[i]["group"]]
    settings += [dict(s, group=s["group"] + len(remap)) for s in new.settings]
    epochs = max(old.curves.shape[1], new.curves.shape[1])

    def pad(curves):
        extra = epochs - curves.shape[1]
        return np.pad(curves, ((0, 0), (0, extra), (0, 0)), constant_values=np.nan)

    # The devices of the groups kept and of the new run, each once at its last place (the
    # newest run's device stays last); a kept group not recorded counts as the old run's.
    kept_devices = [g["device"] or old.device for g in old_groups] + [new.device]
    parts = [p for d in kept_devices for p in d.split("; ")]
    devices = list(dict.fromkeys(reversed(parts)))[::-1]
    robust = (np.concatenate([old.robust[keep], new.robust])
              if new.robust is not None and old.robust is not None else new.robust)
    return replace(new, settings=settings,
                   curves=np.concatenate([pad(old.curves[keep]), pad(new.curves)]),
                   diverged=np.concatenate([old.diverged[keep], new.diverged]),
                   test_probs=np.concatenate([old.test_probs[keep], new.test_probs]),
                   robust=robust, groups=old_groups + new_groups,
                   programs=len(old_groups) + new.programs, device="; ".join(devices),
                   wall_time_s=sum(g["wall_time_s"] for g in old_groups) + new.wall_time_s,
                   overrides={**new.overrides, "merged": {"networks": kept_nets,
                                                          "device": old.device,
                                                          "overrides": old.overrides,
                                                          "sweep_text": old.sweep_text}})
