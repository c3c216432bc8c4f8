"""Sweeps split into shards for job arrays: which members shard I of N trains, and the gathering
of the shards' results into the one result an unsharded run would have written.

A shard is a fixed share of a sweep's members: the members of each static group are dealt out
in turn (`assign`), so every shard trains an equal share, within one member, of every group and
hence of the work, whatever machine computes the split. Shard I of N writes a complete result
of its members to `OUT/NAME.shards/I-of-N/`, recording which members they are; `gather` checks
that the shards are complete, distinct and of one computation (sweep text, overrides, data,
training split, versions, member list) and puts their rows back in the sweep's order.
"""

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uspsjax.errors import InputError

if TYPE_CHECKING:
    from uspsjax.results import Run

SUFFIX = ".shards"
# What every shard of one gathered result must share, by what it is called. The versions are
# those that decide the numbers: shards of other versions are not one computation.
SAME_VERSIONS = ("uspsjax", "jax", "jaxlib", "flax", "optax")
SAME = {"sweep text": lambda run: run.sweep_text,
        "command-line settings": lambda run: run.overrides,
        "data": lambda run: run.data_sha256,
        "training split": lambda run: (run.n_train, run.validation, run.validation_seed),
        "member list": lambda run: (run.shard["count"], run.shard["total"],
                                    run.shard["members_sha256"]),
        "versions": lambda run: {k: run.versions.get(k) for k in SAME_VERSIONS}}


def parse(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N, as a job array's task id) as (I, N); InputError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise InputError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/10")
    return int(match[1]), int(match[2])


def folder_name(index: int, count: int) -> str:
    """The folder of shard `index` of `count` under `OUT/NAME.shards/`."""
    return f"{index}-of-{count}"


def assign(groups: list[list[int]], count: int) -> dict[int, int]:
    """The shard of each member: the members of each group (lists of member indices, in the
    sweep's group order) dealt out in turn, continuing from one group to the next, so that each
    shard gets an equal share of every group within one member and the groups' remainders go
    to different shards."""
    owner, turn = {}, 0
    for idx in groups:
        for i in idx:
            owner[i] = turn % count
            turn += 1
    return owner


def members_hash(rows: list[dict]) -> str:
    """A digest of a sweep's complete member list (each member's row of settings): two shards
    belong to one split only if they split the same list."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _read_shards(folder: Path, sweep_name: str) -> tuple[int, dict[int, "Run"]]:
    """Every shard under `folder`, checked to be one complete split: (N, {I: run})."""
    from uspsjax import results  # h5py and matplotlib: only where results are read
    if not folder.is_dir():
        raise InputError(f"{folder}: no shards to gather; run python -m uspsjax.sweep "
                         f"{sweep_name} --shard I/N for each I first")
    found = {}
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        match = re.fullmatch(r"(\d+)-of-(\d+)", path.name)
        if not match or not path.is_dir():
            raise InputError(f"{path}: not a shard folder (I-of-N); move it away")
        found[path] = int(match[1]), int(match[2])
    if not found:
        raise InputError(f"{folder}: no shards to gather")
    counts = sorted({n for _, n in found.values()})
    if len(counts) > 1:
        raise InputError(f"{folder}: shards of {' and '.join(map(str, counts))}-way splits; "
                         "a gather takes one split: remove the others")
    count = counts[0]
    runs = {}
    for path, (index, _) in found.items():
        try:
            run = results.read_metrics(path / "metrics.h5")
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: cannot read the shard ({' '.join(str(e).split())}); "
                             "run that shard again") from None
        shard = run.shard
        if not shard:
            raise InputError(f"{path}: not a shard's result (no shard record); move it away")
        if (shard["index"], shard["count"]) != (index, count):
            raise InputError(f"{path}: holds shard {folder_name(shard['index'], shard['count'])}"
                             ", a copy under another name (a duplicated shard); remove it")
        runs[index] = run
    missing = [i for i in range(count) if i not in runs]
    if missing:
        raise InputError(f"{folder}: missing shard {folder_name(missing[0], count)}"
                         f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                         f"run python -m uspsjax.sweep {sweep_name} --shard {missing[0]}/{count} "
                         "with the same flags first")
    return count, runs


def gather(folder: Path, sweep_name: str, sweep_text: str) -> "Run":
    """The shards under `folder` (`OUT/NAME.shards`) combined into one `Run`, as an unsharded
    run of the same members would have returned it: rows in the sweep's member order, static
    groups in the order of their first member, each group's wall time and chunks summed over
    the shards that trained it and its devices listed. The `shards` entry records the split.

    InputError, naming the shard, for a missing, duplicated or foreign one (another sweep
    text, command-line settings, data, training split, versions or member list), or for shards
    of another text of the sweep file than `sweep_text`.
    """
    count, runs = _read_shards(folder, sweep_name)
    first = runs[0]
    for index, run in runs.items():
        where = folder / folder_name(index, count)
        for name, record in SAME.items():
            if record(run) != record(first):
                raise InputError(f"{where}: a foreign shard: other {name} than "
                                 f"{folder_name(0, count)}; run it again with the same sweep "
                                 "file, flags, data and versions")
    if first.sweep_text != sweep_text:
        raise InputError(f"{folder}: the shards ran another text of the sweep file; gather "
                         "with the file they ran, or run the shards again")
    total = first.shard["total"]
    owner = np.full(total, -1)
    for index, run in runs.items():
        rows = run.shard["members"]
        if len(rows) != len(run.settings) or (owner[rows] >= 0).any():
            raise InputError(f"{folder / folder_name(index, count)}: its members overlap "
                             "another shard's (a duplicated shard); run it again")
        owner[rows] = index
    if (owner < 0).any():
        raise InputError(f"{folder}: the shards leave members untrained; run them again")
    return _combine(runs, total)


def _versions(parts: list[dict]) -> dict:
    """One group's versions over the shards that trained it: each entry's distinct values,
    joined with " / " in shard order. The shards share those that decide the numbers
    (`SAME_VERSIONS`); the code's own hash or a host's CPU tactics may differ between them."""
    keys = dict.fromkeys(k for g in parts for k in g["versions"] or {})
    return {k: " / ".join(dict.fromkeys(str(g["versions"][k]) for g in parts
                                       if g["versions"] and k in g["versions"]))
            for k in keys}


def _combine(runs: dict[int, "Run"], total: int) -> "Run":
    """One run from shards whose member rows are `run.shard["members"]` of `total`."""
    first = runs[0]
    epochs = max(r.curves.shape[1] for r in runs.values())
    curves = np.full((total, epochs, first.curves.shape[2]), np.nan, np.float32)
    diverged = np.zeros(total, np.int32)
    probs = np.zeros((total, *first.test_probs.shape[1:]), np.float32)
    robust = (None if first.robust is None
              else np.zeros((total, *first.robust.shape[1:]), np.float32))
    settings, group_of = [None] * total, [None] * total
    for run in runs.values():
        rows = run.shard["members"]
        curves[rows, : run.curves.shape[1]] = run.curves
        diverged[rows], probs[rows] = run.diverged, run.test_probs
        if robust is not None:
            robust[rows] = run.robust
        for row, s in zip(rows, run.settings):
            settings[row], group_of[row] = s, run.groups[s["group"]]
    labels = list(dict.fromkeys(g["label"] for g in group_of))
    groups = []
    for label in labels:
        parts = [g for run in runs.values() for g in run.groups if g["label"] == label]
        groups.append({"label": label, "members": sum(g["members"] for g in parts),
                       "wall_time_s": sum(g["wall_time_s"] for g in parts),
                       "chunks": sum(g["chunks"] for g in parts),
                       "device": "; ".join(dict.fromkeys(g["device"] for g in parts)),
                       "versions": _versions(parts), "recorded": True})
    settings = [dict(s, group=labels.index(g["label"])) for s, g in zip(settings, group_of)]
    ordered = [runs[i] for i in sorted(runs)]
    return dataclasses.replace(
        first, settings=settings, curves=curves, diverged=diverged, test_probs=probs,
        robust=robust, groups=groups, programs=len(groups),
        device="; ".join(dict.fromkeys(r.device for r in ordered)),
        wall_time_s=sum(r.wall_time_s for r in ordered), shard=None, created=None, path=None,
        shards={"count": len(runs), "wall_time_s": [r.wall_time_s for r in ordered],
                "devices": [r.device for r in ordered]})
