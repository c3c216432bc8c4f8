"""Running sweeps: `Options` (one request, from the command line `python -m uspsjax.sweep` or
from `uspsjax.run`) planned with every check before anything is written, its folders locked,
each static group of the grid (`grid`) trained as one vmapped population with checkpoints, and
`results/NAME/` (or a shard's folder) written.

    python -m uspsjax.sweep lr                 # sweeps/lr.toml
    python -m uspsjax.sweep path/to/mine.toml --epochs 5 --seeds 2 --networks fc,cnn
"""

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uspsjax import cli, distributed, shards
from uspsjax.errors import InputError, WriteError
from uspsjax.lock import Lock
from uspsjax.grid import (SETTING_DEFAULTS, STUDY_ORDER, Member, Sweep, cpu_limits, describe_group,
                          expand, group_members, list_sweeps, load_sweep, member_settings)
from uspsjax.machine import environment
from uspsjax.models import NETWORKS
from uspsjax.train import DTYPES, settings_table

if TYPE_CHECKING:
    from uspsjax.results import Run

# Suffix of the folder a lower-scale run writes beside a larger result it may not replace.
LOWER_SCALE = ".lower-scale"


def check_mergeable(sweep: Sweep, old: "Run", trained: list[str]) -> None:
    """Raise InputError unless the members of `old` that a merge keeps (the networks not in
    `trained`) are exactly what `sweep` specifies for them, on the kind of device they ran on."""
    from uspsjax import train
    if tuple(old.metrics) != train.metric_names(sweep.validation > 0):
        raise InputError(f"{sweep.path}: the earlier results have the curves "
                         f"{', '.join(old.metrics)}, this sweep's validation split others; "
                         "cannot merge")
    kept = [s for s in old.settings if s["network"] not in trained]
    if not kept:
        return
    nets = [n for n in NETWORKS if any(s["network"] == n for s in kept)]
    over = {k: v for k, v in old.overrides.items() if k in ("epochs", "seeds")}
    expected = [member_settings(m) for m in expand(sweep, {**over, "networks": nets},
                                                   on_cpu=old.device.startswith("cpu"))]
    have = sorted(json.dumps({k: s.get(k, SETTING_DEFAULTS.get(k)) for k in expected[0]},
                             sort_keys=True)
                  for s in kept)
    want = sorted(json.dumps(e, sort_keys=True) for e in expected)
    if have != want:
        raise InputError(f"{sweep.path}: the earlier results of {', '.join(nets)} were not "
                         "trained with this sweep's settings; cannot merge")


# What a checkpoint records of the run that made it, and what each part is called when a
# resume finds it changed.
FINGERPRINT_PARTS = {"sweep": "sweep file", "overrides": "command-line settings (--networks, "
                     "--epochs, --seeds, --dtype)", "data": "data (the arrays' SHA-256)",
                     "versions": "versions of uspsjax, its source or its libraries",
                     "layout": "layout (processes, devices, memory budget, chunks, placement)",
                     "shard": "shard (--shard)"}
# The versions that decide a run's numbers (`environment`): a resume needs all of them equal.
NUMERIC_VERSIONS = ("uspsjax", "source", "jax", "jaxlib", "flax", "optax", "matmul_precision",
                    "lc_lowering", "microbatch")


def fingerprint(sweep: Sweep, overrides: dict, data_hash: str, devices,
                memory_budget: int | None, placement: str, shard: tuple | None) -> dict:
    """What a checkpoint must match to be resumed, part by part (`FINGERPRINT_PARTS`): the
    sweep file, the overrides, the data's content, the versions that decide the numbers, what
    decides where each group trains and how it is split into chunks (the processes, devices,
    memory budget, on a CPU the cache a chunk keeps within and the chunks trained at once, and
    placement), and the shard."""
    import jax
    from uspsjax import population
    device = jax.local_devices()[0]
    layout = {"processes": jax.process_count(), "devices": len(devices or jax.devices()),
              "memory_budget": memory_budget or population.device_memory(device),
              "placement": placement}
    if device.platform == "cpu":
        layout.update(cpu_cache_bytes=population.cpu_cache_bytes(),
                      cpu_lanes=population.cpu_lane_limit())
    versions = environment()[1]
    return {"sweep": sweep.text, "overrides": overrides, "data": data_hash,
            "versions": {k: versions[k] for k in NUMERIC_VERSIONS}, "layout": layout,
            "shard": list(shard) if shard else None}


PLACEMENTS = ("members", "groups")
LIVE_SECONDS = 10  # the longest silence inside an epoch when progress is shown


def place_groups(costs: list[float], n_processes: int) -> list[int]:
    """The process that trains each group, given each group's cost: the costliest group first,
    each to the least loaded process (ties: the lowest index)."""
    load, owners = [0.0] * n_processes, [0] * len(costs)
    for g in sorted(range(len(costs)), key=lambda g: -costs[g]):
        owners[g] = min(range(n_processes), key=lambda p: load[p])
        load[owners[g]] += costs[g]
    return owners


def shard_members(members: list[Member], shard: tuple[int, int] | None) -> list[int]:
    """The indices of the members that shard (I, N) trains (`shards.assign` over the static
    groups); every member without a shard. InputError when the shard would be empty."""
    if shard is None:
        return list(range(len(members)))
    index, count = shard
    if count > len(members):
        raise InputError(f"--shard {index}/{count}: the sweep has {len(members)} members, so at "
                         f"most {len(members)} shards")
    owner = shards.assign(list(group_members(members).values()), count)
    return [i for i in range(len(members)) if owner[i] == index]


@dataclasses.dataclass
class Plan:
    """One sweep of a command, planned once before anything is written (`plan_members`, then
    `_plan` for the command line): what trains, where its result goes and what its checkpoints
    must match. `run_sweep` trains it."""

    sweep: Sweep
    overrides: dict                  # what the command line imposes on every member
    every_member: list[Member]       # the whole grid at this run's scale
    chosen: list[int]                # the indices of the members that train (a shard's share)
    on_cpu: bool = False             # expanded for a CPU (the sweep's `[cpu]` tables)
    shard: tuple[int, int] | None = None
    placement: str = "members"       # one of PLACEMENTS
    memory_budget: int | None = None  # bytes a chunk of members may take (None: the device's)
    checkpoints: Path | None = None  # the run's own checkpoint folder (None: none kept)
    fingerprint: dict | None = None  # what `checkpoints` records (`fingerprint`); set with it
    resume: bool = False
    out: Path | None = None          # the folder that holds the result folder
    folder: str | None = None        # the result folder's name under `out`
    guard: Path | None = None        # what the run's lock guards (OUT/NAME, or the shard's folder)
    old: "Run | None" = None         # the earlier run to merge with
    notice: str | None = None        # said when the result goes beside a larger one
    gathered: "Run | None" = None    # --gather: the shards' combined run; nothing trains

    @property
    def members(self) -> list[Member]:
        """The members that train, in grid order."""
        return [self.every_member[i] for i in self.chosen]

    @property
    def groups(self) -> dict:
        """The static groups of `members`: each Static to the indices of its members."""
        return group_members(self.members)

    def rows(self) -> list[dict]:
        """The settings of the members that train, as metrics.h5 stores them."""
        return [member_settings(m) for m in self.members]


def plan_members(sweep: Sweep, overrides: dict | None = None, on_cpu: bool = False,
                 shard: tuple[int, int] | None = None, **fields) -> Plan:
    """The Plan of `sweep`'s members under `overrides` (on a CPU with `on_cpu`: its `[cpu]`
    tables), of shard (I, N) only when `shard` is given; `fields` set the Plan's other fields.
    InputError for a member the grammar refuses or an empty shard."""
    every = expand(sweep, overrides or {}, on_cpu)
    return Plan(sweep, overrides or {}, every, shard_members(every, shard), on_cpu, shard,
                **fields)


def run_sweep(plan: Plan, dataset, *, devices=None, log=print, live: bool = True,
              data_hash: str | None = None, warn=None) -> "Run":
    """Train every static group of `plan` and return the `results.Run` that `results` writes.

    One program is compiled per static group; each trains all its members at once. With
    placement "members" each group's members are sharded over all `devices` (of every
    process); with "groups" each process trains whole groups on its own devices, balanced by
    `place_groups`, and the results are gathered. With `plan.checkpoints`, every group
    checkpoints after each epoch under that folder (the run's own, such as checkpoints/NAME/),
    stamped with `plan.fingerprint`, and `plan.resume` continues from there (skipping finished
    groups). Progress goes to `log`: a line per epoch and, with `live`, one at least every
    `LIVE_SECONDS` inside long epochs (in a run over several processes, of the groups that
    process 0 trains); a damaged checkpoint is said to `warn` (default: stderr) by the first
    process of its group. A shard's run records which members it trained. `data_hash` is the
    dataset's `data.content_hash`, computed here when not given.
    """
    import jax
    from uspsjax import attacks, data as data_mod, population, train

    sweep, overrides, shard, placement = plan.sweep, plan.overrides, plan.shard, plan.placement
    every_member, members, groups = plan.every_member, plan.members, plan.groups
    warn = warn or cli.say
    data_hash = data_hash or data_mod.content_hash(dataset)
    for net, table in cpu_limits(sweep, overrides, plan.on_cpu).items():
        log(f"sweep {sweep.name}: on this CPU {net} runs with "
            + ", ".join(f"{k}={v}" for k, v in table.items())
            + " (the sweep's [cpu] table; --epochs/--seeds override it)")
    data = train.as_data(data_mod.split_validation(dataset, sweep.validation,
                                                   sweep.validation_seed), on_device=False)
    ckpt_root = plan.checkpoints
    if ckpt_root:
        _prepare_checkpoints(ckpt_root, plan.fingerprint, plan.resume)
    n_train = data.x_train.shape[0]
    owners = None
    if placement == "groups":
        owners = place_groups([len(idx) * population.member_cost(static, n_train)
                               for static, idx in groups.items()], jax.process_count())
        devices = [d for d in devices or jax.devices() if d.process_index == jax.process_index()]
    n_devices = len(devices or jax.devices())
    where = (f"whole groups placed on {jax.process_count()} process"
             f"{'es' if jax.process_count() > 1 else ''}, members sharded over each one's "
             if owners else "members sharded over ")
    part = (f"shard {shard[0]} of {shard[1]}: {len(members)} of {len(every_member)} members"
            if shard else f"{len(members)} members")
    log(f"sweep {sweep.name}: {part} in {len(groups)} static groups "
        f"-> {len(groups)} compiled training programs, {where}{n_devices} "
        f"device{'s' if n_devices > 1 else ''}")
    evaluation = population.Evaluation(sweep.attack_eps, min(sweep.attack_samples,
                                                              data.x_test.shape[0]))
    n_members, max_epochs = len(members), max(s.epochs for s in groups)
    metrics = train.metric_names(data.x_val is not None)
    curves = np.full((n_members, max_epochs, len(metrics)), np.nan, np.float32)
    diverged = np.zeros(n_members, np.int32)
    probs = np.zeros((n_members, data.x_test.shape[0], 10), np.float32)
    robust = np.zeros((n_members, len(attacks.ATTACKS), len(sweep.attack_eps)), np.float32)
    walls, chunks = np.zeros(len(groups)), np.zeros(len(groups), np.int32)
    device, versions = environment()
    t_start = time.perf_counter()
    # Whole groups on several processes: a refusal of one process's own group (a checkpoint of
    # it that no longer restores) is raised at the gather below, which every process joins.
    apart, refusal = bool(owners) and jax.process_count() > 1, None
    for g, (static, idx) in enumerate(groups.items()):
        if owners and owners[g] != jax.process_index():
            continue
        label = describe_group(static)
        keys = jax.numpy.stack([population.member_key(members[i].seed, members[i].bag or None)
                                for i in idx])
        hps = population.stack([train.make_hparams(**members[i].hparams) for i in idx])
        t0 = time.perf_counter()
        last = {"line": t0}

        def progress(info, g=g, label=label, batch=static.batch_size, last=last):
            steps = data.x_train.shape[0] // batch
            step = info.get("step", steps)  # an epoch-end report: the epoch's last step
            now = time.perf_counter()
            if "step" in info and now - last["line"] < LIVE_SECONDS:
                return
            last["line"] = now
            # Chunk-steps: the chunks before, and those training at once (`lanes`) in step.
            lanes, first = info.get("lanes", 1), info["chunk"]
            done = ((first - 1) * info["epochs"] * steps
                    + lanes * ((info["epoch"] - 1) * steps + step))
            total = info["chunks"] * info["epochs"] * steps
            rate = step / info["seconds"]  # steps per second in this epoch
            chunk = (f" chunks {first}-{first + lanes - 1}/{info['chunks']}"
                     if "step" in info and lanes > 1 else
                     f" chunk {first}/{info['chunks']}" if info["chunks"] > 1 else "")
            where = (f"epoch {info['epoch']}/{info['epochs']}" if "step" not in info else
                     f"epoch {info['epoch']}/{info['epochs']} step {step}/{steps}")
            log(f"  [{g + 1}/{len(groups)}] {label}{chunk}: {where}, {info['members']} members, "
                f"{info['members'] * batch * rate:,.0f} samples/s, "
                f"~{max(0, total - done) / (rate * lanes):.0f} s left")

        ckpt = ckpt_root / f"group{g}" if ckpt_root else None
        if ckpt:
            ckpt.mkdir(parents=True, exist_ok=True)
        try:
            res = population.run_group(static, keys, hps, data, devices=devices,
                                       memory_budget=plan.memory_budget, evaluation=evaluation,
                                       checkpoint=ckpt, on_epoch=progress,
                                       on_step=progress if live else None, warn=warn)
        except InputError as e:
            if not apart:
                raise
            refusal = str(e)
            break
        wall = time.perf_counter() - t0
        if res.chunks > 1:
            log(f"  [{g + 1}/{len(groups)}] {label}: ran as {res.chunks} chunks of "
                f"{res.chunk_members} members, {res.lanes} at a time (to fit the memory or, on "
                f"a CPU, the cache)")
        curves[idx, : static.epochs] = res.curves
        diverged[idx] = res.diverged
        probs[idx] = res.test_probs
        if sweep.attack_eps:
            robust[idx] = res.robust
        walls[g], chunks[g] = wall, res.chunks
        log(f"  [{g + 1}/{len(groups)}] {label}: {len(idx)} members done in {wall:.1f} s")
    if apart:
        distributed.agree(refusal)
        # Each process holds its own groups' rows: take every group's from its owner.
        mine = {"curves": curves, "diverged": diverged, "probs": probs, "robust": robust,
                "walls": walls, "chunks": chunks}
        every = {k: distributed.gather(v) for k, v in mine.items() if v.size}
        for g, idx in enumerate(groups.values()):
            for k in ("curves", "diverged", "probs", "robust"):
                if k in every:
                    mine[k][idx] = every[k][owners[g]][idx]
            for k in ("walls", "chunks"):
                mine[k][g] = every[k][owners[g]][g]
            if owners[g]:
                log(f"  [{g + 1}/{len(groups)}] {describe_group(list(groups)[g])}: "
                    f"{len(idx)} members done in {walls[g]:.1f} s on process {owners[g]}")
    group_info = [{"label": describe_group(static), "members": len(idx),
                   "wall_time_s": float(walls[g]), "chunks": int(chunks[g]), "device": device,
                   "versions": versions, "recorded": True}
                  for g, (static, idx) in enumerate(groups.items())]
    settings = []
    for g, (static, idx) in enumerate(groups.items()):
        for i in idx:
            m = members[i]
            settings.append((i, {**member_settings(m), "group": g}))
    from uspsjax.results import Run
    return Run(
        name=sweep.name, description=sweep.description, sweep_text=sweep.text,
        overrides=overrides, metrics=metrics,
        settings=[s for _, s in sorted(settings, key=lambda t: t[0])],
        curves=curves, diverged=diverged, test_probs=probs, y_test=np.asarray(data.y_test),
        n_train=int(data.x_train.shape[0]), validation=sweep.validation,
        validation_seed=sweep.validation_seed,
        robust=robust if sweep.attack_eps else None, attack_eps=list(sweep.attack_eps),
        ensemble=sweep.ensemble, study=sweep.study, device=device, versions=versions,
        wall_time_s=time.perf_counter() - t_start, programs=len(groups), groups=group_info,
        data_sha256=data_hash,
        shard=None if shard is None else {
            "index": shard[0], "count": shard[1], "members": plan.chosen,
            "total": len(every_member),
            "members_sha256": shards.members_hash([member_settings(m) for m in every_member])})


STAMP = "sweep.json"   # a checkpoint folder's record of the run that made it (`fingerprint`)
LOCK = ".lock"         # inside a checkpoint folder; OUT/.NAME.lock beside a result folder


def read_stamp(root: Path) -> dict:
    """The fingerprint a checkpoint folder records; InputError when there is none or it is
    damaged (not the JSON this engine writes)."""
    stamp = root / STAMP
    if not stamp.is_file():
        raise InputError(f"{root}: nothing to resume (no checkpoint of this sweep)")
    try:
        saved = json.loads(stamp.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        saved = e
    if not isinstance(saved, dict):
        raise InputError(f"{stamp}: damaged, not the record uspsjax writes; remove {root}/ to "
                         "start again") from None
    return saved


def check_resumable(root: Path, expected: dict) -> None:
    """InputError unless the checkpoint in `root` was made by the computation `expected` (a
    `fingerprint`), naming every part that differs and what to do."""
    saved, expected = read_stamp(root), json.loads(json.dumps(expected))
    differs = [name for part, name in FINGERPRINT_PARTS.items()
               if saved.get(part) != expected[part]]
    if differs:
        need = "the same data" if saved.get("data") != expected["data"] else "the same run"
        raise InputError(f"{root}: the checkpoint was made with another "
                         f"{'; another '.join(differs)}; --resume needs {need}, or remove "
                         f"{root}/ to start again")


def check_checkpoint_folder(root: Path) -> None:
    """InputError unless `root` is absent or a checkpoint folder of uspsjax (it holds its
    `STAMP`), so that starting afresh removes nothing the engine did not write."""
    if not root.exists() and not root.is_symlink():
        return
    if root.is_symlink() or not root.is_dir():
        raise InputError(f"{root}: exists and is not a uspsjax checkpoint folder; move it away "
                         "or choose another --checkpoints")
    if not (root / STAMP).is_file() and any(p.name != LOCK for p in root.iterdir()):
        raise InputError(f"{root}: not a uspsjax checkpoint folder (no {STAMP}); move it away "
                         "or choose another --checkpoints")


def _prepare_checkpoints(root: Path, expected: dict, resume: bool) -> None:
    """Start fresh checkpoints in `root` (process 0 clears what an earlier run of this sweep
    left, keeping the lock, while the others wait), or check that the ones to resume are of
    this computation (`check_resumable`)."""
    if resume:
        check_resumable(root, expected)
        return
    if distributed.is_writer():
        check_checkpoint_folder(root)
        if root.is_dir():
            for path in root.iterdir():
                if path.name != LOCK:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / STAMP).write_text(json.dumps(expected, sort_keys=True))
        except OSError as e:
            raise WriteError(f"{root / STAMP}: cannot write ({e.strerror}); nothing has "
                             "trained") from None
    distributed.barrier(f"{root} prepared")


def build_parser() -> cli.Parser:
    """The command line of `python -m uspsjax.sweep`."""
    p = cli.Parser(prog="python -m uspsjax.sweep",
                   description="Train every member of a sweep (a grid of networks x settings x "
                               "seeds) as vmapped populations, one compiled program per static "
                               "group, and write results/NAME/ (metrics.h5, summary.md, figures).",
                   epilog="Settings a sweep file may set ([base], [per_network.NET], [axes]):\n\n"
                          + settings_table(),
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="a sweep name from sweeps/ (see --list), a path to a "
                   "sweep TOML file, or 'all' for every study sweep in order")
    p.add_argument("--list", action="store_true", help="list the shipped sweeps and exit")
    p.add_argument("--networks", type=cli.networks,
                   help="comma-separated networks to run (default: the sweep's)")
    p.add_argument("--epochs", type=cli.positive_int,
                   help="epochs for every member (overrides the sweep)")
    p.add_argument("--seeds", type=cli.positive_int, help="seeds per setting (overrides the sweep)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="compute dtype for every member (parameters stay float32)")
    p.add_argument("--data", help="the USPS h5 file (default: $USPSJAX_DATA, the user cache, "
                   "else download and verify the public copy)")
    p.add_argument("--out", default="results", help="results folder (default: results/)")
    p.add_argument("--checkpoints", default="checkpoints",
                   help="where per-epoch checkpoints go (default: checkpoints/, git-ignored)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="do not checkpoint (fast accelerators: writing an LC population every "
                        "epoch costs more than training it); --resume is then impossible")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last completed epoch")
    p.add_argument("--devices", type=cli.positive_int,
                   help="shard the member axis over this many local devices (default: all)")
    p.add_argument("--distributed", action="store_true",
                   help="run one sweep over several processes or hosts (JAX's multi-controller "
                        "runtime; the coordinator found by Slurm, TPU pod or Open MPI detection, "
                        "or given below; README 'Scale-out')")
    p.add_argument("--placement", choices=PLACEMENTS, default="members",
                   help="members: shard each static group's members over every device of every "
                        "process, one group after another (default); groups: each process "
                        "trains whole groups on its own devices, balanced by their FLOPs")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="with --distributed: process 0's address (else $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=cli.positive_int,
                   help="with --distributed: how many processes (else $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int,
                   help="with --distributed: this process, 0 .. N-1 (else $JAX_PROCESS_ID)")
    p.add_argument("--init-timeout", type=cli.positive_int, default=distributed.INIT_TIMEOUT_S,
                   help="with --distributed: seconds to wait for the coordinator and the other "
                        f"processes (default {distributed.INIT_TIMEOUT_S})")
    p.add_argument("--heartbeat-timeout", type=cli.positive_int,
                   default=distributed.HEARTBEAT_TIMEOUT_S,
                   help="with --distributed: seconds without a sign of life after which the "
                        "other processes give up on a process and stop (default "
                        f"{distributed.HEARTBEAT_TIMEOUT_S})")
    p.add_argument("--merge", action="store_true",
                   help="keep, from the existing results of this sweep, the networks this run "
                        "does not train (e.g. LC trained on a GPU, the rest here)")
    p.add_argument("--replace", action="store_true",
                   help="let a run of lower scale (fewer epochs or seeds for some network) "
                        f"replace OUT/NAME/; without it such a run goes to OUT/NAME{LOWER_SCALE}/")
    p.add_argument("--shard", metavar="I/N",
                   help="train only shard I of N (0 <= I < N; a job array's task id): a fixed "
                        "share of every static group's members, written to "
                        f"OUT/NAME{shards.SUFFIX}/I-of-N/ with its own checkpoints")
    p.add_argument("--gather", action="store_true",
                   help=f"combine the shards in OUT/NAME{shards.SUFFIX}/ into OUT/NAME/ (with "
                        "--merge beside the networks already there); nothing is trained")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def run_scale(settings: list[dict]) -> dict[str, tuple[int, int]]:
    """Per network, (the most epochs any member trains, the number of seeds) of a run's rows of
    settings (as `member_settings` makes them and metrics.h5 stores them)."""
    nets = dict.fromkeys(s["network"] for s in settings)
    return {n: (max(int(s["epochs"]) for s in settings if s["network"] == n),
                len({int(s["seed"]) for s in settings if s["network"] == n})) for n in nets}


def larger_result(old_settings: list[dict], rows: list[dict], merge: bool) -> str | None:
    """Where an earlier result holds more than a run of the members `rows` (their settings, as
    `member_settings` makes them) would: for each network, more epochs or more seeds, or
    (unless `merge` keeps them) a network the run lacks. None when the run is of the same or
    higher scale, else a description such as "lc 3 seeds x 30 epochs, this run 3 x 3"."""
    new = run_scale(rows)
    larger = []
    for net, (epochs, seeds) in run_scale(old_settings).items():
        got_epochs, got_seeds = new.get(net, (0, 0))
        if (net in new or not merge) and (got_epochs < epochs or got_seeds < seeds):
            larger.append(f"{net} {seeds} seeds x {epochs} epochs, this run "
                          + (f"{got_seeds} x {got_epochs}" if net in new else "none"))
    return "; ".join(larger) or None


def check_batches(sweep: Sweep, rows: list[dict], n_train: int) -> None:
    """InputError if a batch of the members `rows` exceeds the `n_train` training samples."""
    biggest = max(r["batch_size"] for r in rows)
    if biggest > n_train:
        raise InputError(f"{sweep.path}: batch_size = {biggest} exceeds the {n_train} training "
                         "samples of the data")


def plan_output(sweep: Sweep, rows: list[dict], n_train: int, y_test, data_hash: str,
                out: Path, merge: bool, replace: bool) -> tuple[str, dict | None, str | None]:
    """Decide, before training, where a run of the members `rows` (their settings) goes and
    check that it can.

    Returns (the folder name under `out`, the earlier run to merge with or None, a line to say
    when the run goes beside the earlier result). The folder is NAME, or NAME + LOWER_SCALE when
    NAME holds a larger result and not `replace`. InputError if a batch exceeds the `n_train`
    training samples, the folder is not a uspsjax result folder, the earlier result cannot be
    read, or a merge would mix settings or data (another content hash, training-set size or
    test labels than the data's `data_hash` and `y_test`).
    """
    from uspsjax import results
    check_batches(sweep, rows, n_train)
    results.check_replaceable(out / sweep.name)
    done = out / sweep.name / "metrics.h5"
    if not done.exists() or (replace and not merge):
        return sweep.name, None, None
    try:
        old = results.read_metrics(done)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{done}: cannot read the existing result ({' '.join(str(e).split())}); "
                         "move it away, or --replace it") from None
    if merge:
        # Results written before the data's hash or `n_train` were recorded: the rest decides.
        if old.n_train not in (None, n_train) or not np.array_equal(old.y_test, y_test):
            raise InputError(f"{done}: the earlier run trained on {old.n_train} images and "
                             f"tested on {len(old.y_test)}; this data has {n_train} and "
                             f"{len(y_test)}, or other test labels: cannot merge")
        if old.data_sha256 not in (None, data_hash):
            raise InputError(f"{done}: the earlier run trained on other data (SHA-256 "
                             f"{old.data_sha256[:12]}..., this data {data_hash[:12]}...): "
                             "cannot merge")
        check_mergeable(sweep, old, list(dict.fromkeys(r["network"] for r in rows)))
    larger = None if replace else larger_result(old.settings, rows, merge)
    if larger is None:
        return sweep.name, old if merge else None, None
    beside = sweep.name + LOWER_SCALE
    results.check_replaceable(out / beside)
    return beside, old if merge else None, (
        f"{out / sweep.name}/ holds a larger run ({larger}); writing {out / beside}/ instead; "
        "--replace to overwrite")


def _overrides(args) -> dict:
    """The settings the command line imposes on every member."""
    overrides = {}
    if args.networks is not None:
        overrides["networks"] = list(args.networks)
    for key in ("epochs", "seeds", "dtype"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return overrides


def _devices(args) -> list | None:
    """The devices to shard over (`--devices`; None: all, those of every process)."""
    import jax
    if not args.devices:
        return None
    if args.distributed:
        raise InputError("--devices: with --distributed every device of every process is used")
    if args.devices > len(jax.devices()):
        raise InputError(f"--devices {args.devices}: only {len(jax.devices())} devices here")
    return jax.devices()[: args.devices]


def _plan_gather(args, sweep: Sweep, out: Path) -> Plan:
    """The plan of `--gather`: the shards of `sweep` under OUT/NAME.shards/, checked and
    combined (`shards.gather`), and where their result goes; nothing trains."""
    if _overrides(args) or args.resume or args.devices or args.distributed:
        raise InputError("--gather takes the shards as they ran: no --networks, --epochs, "
                         "--seeds, --dtype, --resume, --devices or --distributed")
    run = shards.gather(out / (sweep.name + shards.SUFFIX), sweep.name, sweep.text)
    name, old, notice = plan_output(sweep, run.settings, run.n_train, run.y_test,
                                    run.data_sha256, out, args.merge, args.replace)
    return Plan(sweep, {}, [], [], out=out, folder=name, guard=out / sweep.name, old=old,
                notice=notice, gathered=run)


def _plan(args, log) -> tuple:
    """Every check of a run (sweep files, flags, data, devices, the output and checkpoint
    folders, what an earlier result or checkpoint allows), nothing written. Returns (the
    plans, overrides, dataset, devices, the data's content hash)."""
    if not args.sweep:
        raise InputError("no sweep given (try --list)")
    if args.sweep == "all" and (args.shard or args.gather):
        raise InputError("--shard and --gather take one sweep, not all")
    if args.shard and args.gather:
        raise InputError("--shard trains one shard, --gather combines them: one at a time")
    shard = shards.parse(args.shard) if args.shard else None
    if shard and (args.merge or args.replace):
        raise InputError("--merge and --replace go with --gather: a shard's folder holds only "
                         "its own members, merged when the shards are gathered")
    sweeps = [load_sweep(n) for n in (STUDY_ORDER if args.sweep == "all" else [args.sweep])]
    out, checkpoints = Path(args.out), Path(args.checkpoints)
    cli.check_out(out)
    if args.gather:
        plan = _plan_gather(args, sweeps[0], out)
        return [plan], {}, None, None, plan.gathered.data_sha256
    overrides = _overrides(args)
    if args.resume and args.no_checkpoints and args.sweep != "all":
        raise InputError("--resume and --no-checkpoints: nothing to resume from")
    devices = _devices(args)
    import jax
    on_cpu = (devices or jax.devices())[0].platform == "cpu"
    # Every member of every sweep is checked before the data is read.
    plans = [plan_members(sweep, overrides, on_cpu, shard, placement=args.placement)
             for sweep in sweeps]
    from uspsjax import data as data_mod, results
    dataset = data_mod.load(args.data)
    data_hash = data_mod.content_hash(dataset)
    kept = []
    for plan in plans:
        sweep = plan.sweep
        if not args.no_checkpoints:
            plan.checkpoints = checkpoints / sweep.name
            if shard:
                plan.checkpoints = (checkpoints / (sweep.name + shards.SUFFIX)
                                    / shards.folder_name(*shard))
            check_checkpoint_folder(plan.checkpoints)
            plan.fingerprint = fingerprint(sweep, overrides, data_hash, devices, None,
                                           args.placement, shard)
        resumable = plan.checkpoints is not None and (plan.checkpoints / STAMP).exists()
        done = out / sweep.name / "metrics.h5"
        if args.sweep == "all" and args.resume and done.exists() and not resumable:
            log(f"sweep {sweep.name}: already complete in {done}, skipped")
            continue
        if args.resume and args.sweep != "all":
            check_resumable(plan.checkpoints, plan.fingerprint)
        plan.resume = args.resume and resumable
        n_train = len(dataset.y_train) - sweep.validation
        if shard:
            plan.out, plan.folder = out / (sweep.name + shards.SUFFIX), shards.folder_name(*shard)
            plan.guard = plan.out / plan.folder
            check_batches(sweep, plan.rows(), n_train)
            results.check_replaceable(plan.guard)
        else:
            plan.out, plan.guard = out, out / sweep.name
            plan.folder, plan.old, plan.notice = plan_output(
                sweep, plan.rows(), n_train, dataset.y_test, data_hash, out, args.merge,
                args.replace)
        kept.append(plan)
    return kept, overrides, dataset, devices, data_hash


def _take_locks(plans: list[Plan], held: list) -> None:
    """Lock every plan's result (OUT/.NAME.lock) and checkpoint folder (its `LOCK`) for this
    process, appending each lock to `held`; InputError naming the first that another run
    holds."""
    for plan in plans:
        held.append(Lock(plan.guard.parent / f".{plan.guard.name}.lock", str(plan.guard)))
        if plan.checkpoints:
            held.append(Lock(plan.checkpoints / LOCK, str(plan.checkpoints)))


def _launch_parts(args, plans: list[Plan], overrides: dict, data_hash: str) -> dict:
    """What every process of a distributed run must have been given alike, by name."""
    versions = environment()[1]
    flags = {k: getattr(args, k) for k in ("placement", "resume", "no_checkpoints", "merge",
                                           "replace", "shard", "gather", "devices")}
    return {"sweep files": [plan.sweep.text for plan in plans], "command-line settings":
            {**overrides, **flags}, "data": data_hash,
            "versions": {k: versions[k] for k in NUMERIC_VERSIONS}}


def _written_or_said(plan: Plan, run: "Run", writer: bool, log) -> int:
    """Write a plan's result (merged with the earlier one where it merges); 0, or 1 with one
    `error:` line when the write fails (a full disk): the earlier result stays untouched and
    the line says where the training survives."""
    from uspsjax import results
    if not writer:
        return 0
    if plan.old is not None:
        run = results.merge_runs(plan.old, run, SETTING_DEFAULTS)
    target = plan.out / plan.folder
    try:
        folder = results.write_results(plan.out, dataclasses.replace(run, name=plan.folder))
    except (OSError, RuntimeError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        kept = (f"the training is kept in {plan.checkpoints}/: free space, then run the same "
                "command with --resume (it writes the result without training)"
                if plan.checkpoints else "the shards are kept: free space and --gather again"
                if plan.gathered else "the training is lost (--no-checkpoints)")
        print(f"error: cannot write {target}/ ({reason}); the earlier result is untouched; "
              f"{kept}", file=sys.stderr)
        return 1
    if plan.checkpoints:
        shutil.rmtree(plan.checkpoints, ignore_errors=True)
    print((folder / "summary.md").read_text())
    log(f"sweep {plan.sweep.name}: {run.wall_time_s:.0f} s on {run.device}; wrote {folder}/")
    if plan.notice:
        cli.say(f"sweep {plan.sweep.name}: {plan.notice}")
    return 0


@dataclasses.dataclass(frozen=True)
class Options:
    """One request to run sweeps, as `execute` takes it: the flags of `python -m uspsjax.sweep`
    (`build_parser`, whose help describes each) and the keywords of `uspsjax.run`, by the
    same names. `checked()` validates the values a parser has not already converted."""

    sweep: str | None = None         # a shipped name, a TOML path, or "all"
    networks: tuple[str, ...] | None = None
    epochs: int | None = None
    seeds: int | None = None
    dtype: str | None = None
    data: str | None = None
    out: str = "results"
    checkpoints: str = "checkpoints"
    no_checkpoints: bool = False
    resume: bool = False
    devices: int | None = None
    placement: str = PLACEMENTS[0]
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: int = distributed.INIT_TIMEOUT_S
    heartbeat_timeout: int = distributed.HEARTBEAT_TIMEOUT_S
    distributed: bool = False        # (after the defaults above that read the module)
    merge: bool = False
    replace: bool = False
    shard: str | None = None
    gather: bool = False
    quiet: bool = False

    @classmethod
    def of(cls, args: argparse.Namespace) -> "Options":
        """The options of parsed command-line flags (`build_parser`)."""
        return cls(**{k: v for k, v in vars(args).items() if k != "list"})

    def checked(self) -> "Options":
        """These options with every value checked and normalized as the command line's parser
        does it (`cli.positive_int`, `cli.networks`, the choices); InputError otherwise."""
        changes = {}
        for name in ("epochs", "seeds", "devices", "num_processes", "init_timeout",
                     "heartbeat_timeout"):
            value = getattr(self, name)
            if value is not None:
                try:
                    changes[name] = cli.positive_int(str(value))
                except argparse.ArgumentTypeError as e:
                    raise InputError(f"--{name.replace('_', '-')}: {e}") from None
        for name, choices in (("dtype", DTYPES), ("placement", PLACEMENTS)):
            if getattr(self, name) not in (None, *choices):
                raise InputError(f"--{name}: {getattr(self, name)!r} is not one of "
                                 f"{', '.join(choices)}")
        if self.networks is not None:
            changes["networks"] = cli.networks(self.networks)
        return dataclasses.replace(self, **changes)

    def command_line(self) -> list[str]:
        """The `python -m uspsjax.sweep` command that asks for these options."""
        argv = ["python", "-m", "uspsjax.sweep", *([self.sweep] if self.sweep else [])]
        for field in dataclasses.fields(self):
            value, flag = getattr(self, field.name), "--" + field.name.replace("_", "-")
            if field.name == "sweep" or value == field.default:
                continue
            argv += [flag] if value is True else [flag, ",".join(value) if field.name ==
                                                  "networks" else str(value)]
        return argv


@cli.command
def main(argv=None) -> int:
    """Entry point of `python -m uspsjax.sweep`: the command line's flags as `Options`, run by
    `execute` (as `uspsjax.run` runs its keywords); returns the exit status, and 2 with a
    one-line error for bad input."""
    args = build_parser().parse_args([str(a) for a in (sys.argv[1:] if argv is None else argv)])
    if args.list:
        for name in list_sweeps():
            print(f"{name:12s} {load_sweep(name).description}")
        return 0
    return execute(Options.of(args))[0]


def execute(options: Options) -> tuple[int, list[Path]]:
    """Run `options` (the command line's, or the Python API's): (the exit status, the result
    folders written). InputError for bad input; WriteError when a checkpoint cannot be written
    as it trains. The status is 0, 1 when a result cannot be written, 130 after Ctrl-C and 143
    after SIGTERM (the checkpoint kept).

    Every check runs before anything trains or is written (`_plan`), then the run locks its
    result and checkpoint folders. With `--distributed` the processes first join, then refuse
    together if any of them refuses or they were not started alike, and return the same
    status; only process 0 prints progress and results and writes them.
    """
    args = options.checked()
    launch = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in launch) and not args.distributed:
        raise InputError("--coordinator, --num-processes and --process-id go with --distributed")
    if args.distributed:
        distributed.initialize(distributed.launch_settings(
            *launch, args.init_timeout, heartbeat_s=args.heartbeat_timeout))
    writer = distributed.is_writer()
    quiet = args.quiet or not writer
    log = cli.silent if quiet else cli.say
    # Every process warns: a group placed on one process of several finds its own faults
    # (`population.run_group` has one process of each group say them).
    warn = cli.say
    refusal, locks = None, []
    try:
        try:
            plans, overrides, dataset, devices, data_hash = _plan(args, log)
        except InputError as e:
            refusal = str(e)
        distributed.agree(refusal)
        distributed.agree_on(_launch_parts(args, plans, overrides, data_hash))
        try:  # the first write: only once every process has agreed to run
            if writer:
                _take_locks(plans, locks)
        except InputError as e:
            refusal = str(e)
        distributed.agree(refusal)
        for plan in plans:
            if plan.notice and writer:
                cli.say(f"sweep {plan.sweep.name}: {plan.notice}")
        status, plan, written = 0, None, []
        with cli.sigterm_as_interrupt():
            try:
                for plan in plans:
                    run = plan.gathered or run_sweep(plan, dataset, devices=devices, log=log,
                                                    live=not quiet, data_hash=data_hash,
                                                    warn=warn)
                    distributed.barrier(f"{plan.sweep.name} trained")
                    status = _written_or_said(plan, run, writer, log)
                    if status:
                        break
                    written.append(plan.out / plan.folder)
            except KeyboardInterrupt as e:
                how, code = (("terminated", 143) if isinstance(e, cli.Terminated)
                             else ("interrupted", 130))
                resume = shlex.join(dataclasses.replace(args, resume=True).command_line())
                kept = (f"the last completed epoch is checkpointed in {plan.checkpoints}/; "
                        f"continue with: {resume}" if plan and plan.checkpoints else
                        "nothing was checkpointed (--no-checkpoints): run it again" if plan
                        else "nothing had started")
                print(f"\n{how}: {kept}", file=sys.stderr)
                return code, written
        # Leave no empty folder behind a finished run: the ones its checkpoints were in.
        parents = dict.fromkeys(j.checkpoints.parent for j in plans if j.checkpoints)
        for folder in [*parents, Path(args.checkpoints)] if writer and parents else []:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        return distributed.agree_status(status), written
    finally:
        for lock in locks:
            lock.release()


if __name__ == "__main__":
    cli.exit(main())
