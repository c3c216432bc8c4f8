"""Training a population of members of one static group as one compiled program.

`MEMBER_AXIS` (the leading axis) is the one vectorized axis: every array here that belongs to a
member (keys, `Hparams`, `MemberState`, curves) carries it first, and `train.train_epoch` is
`vmap`ped over it. The member axis is sharded across the chosen devices with `jax.sharding`
(the population is padded to a multiple of the device count), and split into chunks run one
after another when the whole population would not fit the device memory or, on a CPU, its
last-level cache (`cpu_members_per_chunk`). A CPU trains two chunks at once, each from a thread
of its own (`cpu_lanes`): XLA:CPU runs many of a small step's operations on one core.

After every epoch the chunk's state is checkpointed atomically (orbax: every process saves its
own shards), so `run_group(..., checkpoint=)` resumes an interrupted run from its last completed
epoch with identical results. The devices may belong to several processes (`distributed`): the
member axis then spans all of them, and every process gets the same numpy results back.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uspsjax import attacks, distributed, machine, train
from uspsjax.errors import InputError, WriteError
from uspsjax.train import Data, Hparams, Static

MEMBER_AXIS = 0
STEP_CALL_SECONDS = 2.0  # the spacing of `on_step` calls inside an epoch
# On a CPU, members vmapped together share its last-level cache: once a step's parameters,
# optimizer state and activations outgrow about half of it, every member trains slower than it
# would alone (NOTES §14, a 32 MiB L3: 8 CNN members at batch 16 at 0.64-0.87x). A larger cache
# gave nothing more: with a 105 MiB L3, 64 FC members in chunks of 37 (48 MiB) trained no faster
# than in chunks of 12 (16 MiB) (NOTES §17). So chunks keep a step's working set within half the
# machine's last-level cache, at most this many bytes (`cpu_cache_bytes`)...
CPU_CACHE_MAX_BYTES = 16 * 2**20
# ...unless the machine is one measured to do better with another budget, named by its CPU's
# family/model and last-level cache in bytes (the same family/model comes with different caches).
# A Xeon 6/167 with a 480 MiB L3: 64 FC members at batch 16 1.17x as fast with 32 MiB as with
# 16, 8 CNN members 1.07x (two chunks at once; NOTES §24).
CPU_CACHE_MEASURED = {("6/167", 480 * 2**20): 32 * 2**20}
CHECKPOINTS_KEPT = 2  # epochs kept per chunk: the latest, and the one before in case it is damaged
# Every checkpoint epoch's files by SHA-256, written beside them once orbax has finished: an
# epoch is restored only if every byte is as saved. Orbax would otherwise read a damaged file
# part way, fail, and leave its other reads to finish on a closed event loop (tracebacks at
# exit), or decode a changed byte that its compression does not check into other numbers.
MANIFEST = "uspsjax-sha256.json"
UNFINISHED = ".unfinished"  # an epoch folder being written (orbax's: ".orbax-checkpoint-tmp")


@dataclass(frozen=True)
class Evaluation:
    """What is measured on the test set after training, besides the curves."""

    attack_eps: tuple = ()        # robust accuracy under FGSM and PGD-20 at each epsilon
    attack_samples: int = 2007    # the first this many test samples are attacked


def stack(trees: list):
    """Stack per-member pytrees along `MEMBER_AXIS`."""
    return jax.tree.map(lambda *xs: jnp.stack(xs, MEMBER_AXIS), *trees)


def member_key(seed: int, bag: int | None = None) -> jax.Array:
    """A member's key: from its seed alone (so settings compared at one seed start alike), split
    again by its bag index in bagging runs."""
    key = jax.random.key(seed)
    return key if bag is None else jax.random.fold_in(key, bag)


def robust_accuracy(static: Static, state: train.MemberState, hp: Hparams, x, y,
                    eps: jax.Array, chunk: int = 256) -> jax.Array:
    """Accuracy under FGSM and under PGD-20 (random start, step 2.5 eps / 20) for each epsilon in
    `eps`, on (x, y). Returns `(len(ATTACKS), len(eps))`."""
    n = x.shape[0]
    pad = -n % chunk
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[1])
    ys = jnp.pad(y, (0, pad)).reshape(-1, chunk)
    valid = (jnp.arange(n + pad) < n).reshape(-1, chunk)

    def correct(xb, yb, e):
        def loss_fn(x_in):
            logits = train.forward(static, state.params, state.batch_stats, x_in, hp,
                                   train=False)[0]
            return jnp.sum(train.cross_entropy(logits, yb))

        def hits(x_in):
            logits = train.forward(static, state.params, state.batch_stats, x_in, hp,
                                   train=False)[0]
            return jnp.argmax(logits, -1) == yb

        x_fgsm = attacks.fgsm(loss_fn, xb, e)
        x_pgd = attacks.pgd(loss_fn, xb, e, steps=20, step_size=2.5 * e / 20,
                            key=jax.random.key(0))
        return jnp.stack([hits(x_fgsm), hits(x_pgd)])

    def per_chunk(args):
        xb, yb, vb = args
        return jax.vmap(lambda e: correct(xb, yb, e) & vb)(eps)  # (eps, attacks, chunk)

    counts = jax.lax.map(per_chunk, (xs, ys, valid)).sum(axis=(0, 3))
    return (counts / n).T


@cache
def member_sizes(static: Static) -> tuple[int, int]:
    """(parameters, activation values per sample: every layer's output) of one member. Kept
    per static setting: tracing the network takes ~0.2 s, and planning a sweep (or estimating
    one, `uspsjax.scaling`) asks again for the same settings."""
    model = train.make_model(static)
    variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0),
                               jnp.zeros((1, 256)))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    _, inter = jax.eval_shape(partial(model.apply, train=False, capture_intermediates=True,
                                      mutable=["intermediates"]), variables, jnp.zeros((1, 256)))
    return n_params, sum(int(np.prod(v.shape)) for v in jax.tree.leaves(inter))


def bytes_per_member(static: Static, n_train: int) -> int:
    """An estimate of one member's device memory: parameters, momentum, gradients and the
    updated copy (4 x parameters), plus a batch's activations kept for the backward pass."""
    n_params, per_sample = member_sizes(static)
    # The LC layer builds a patch tensor kernel-size times its input: count activations 3x.
    batch = max(static.batch_size, 512)  # evaluation runs in chunks of 512
    return 4 * (4 * n_params + 3 * batch * per_sample) + 8 * n_train


def cache_budget(family_model: str, last_level: int | None) -> int:
    """The cache a chunk of members keeps a step within on a CPU of `family_model` ("6/167")
    whose last-level cache holds `last_level` bytes (None: unknown): the budget measured for that
    machine (`CPU_CACHE_MEASURED`), else half the cache, at most `CPU_CACHE_MAX_BYTES` (that,
    where the cache is unknown)."""
    if (family_model, last_level) in CPU_CACHE_MEASURED:
        return CPU_CACHE_MEASURED[family_model, last_level]
    return min(CPU_CACHE_MAX_BYTES, last_level // 2) if last_level else CPU_CACHE_MAX_BYTES


@cache
def cpu_cache_bytes() -> int:
    """`cache_budget` of this machine (its last-level cache: L3, else L2, as the kernel reports
    it). Fixed for a machine, so a command splits a group the same way on it every time."""
    return cache_budget(machine.cpu()["family_model"],
                        machine.cache_bytes("L3") or machine.cache_bytes("L2"))


def cpu_members_per_chunk(static: Static, lanes: int = 1) -> int:
    """How many members a CPU trains together: as many as keep a training step's working set
    (parameters, momentum and gradients, and the batch's activations, float32) within
    `cpu_cache_bytes()`, shared by the `lanes` chunks that train at once, at least one. Depends
    on the static settings and the machine's cache only, so a command always splits a group the
    same way on one machine. It counts the whole
    batch even where a step works through it in blocks (`train.microbatch_size`): two CNN
    members at batch 1024 in blocks of 32 trained at 0.8x of one at a time
    (results/bench/NOTES.md §15)."""
    n_params, per_sample = member_sizes(static)
    step_bytes = 4 * (3 * n_params + static.batch_size * per_sample)
    return max(1, cpu_cache_bytes() // lanes // step_bytes)


def forward_flops(static: Static) -> float:
    """FLOPs of one forward pass of one sample of the network `static` describes: XLA's count of
    the lowered program (matrix products at 2 per multiply-accumulate, and the elementwise work,
    about 0.5 % more), the LC's products counted as XLA's dots (the C kernels run the same
    products, and XLA counts nothing in a custom call)."""
    model = train.make_model(replace(static, lc_lowering="sliced"))
    x = jnp.zeros((1, 256))
    variables = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), x)
    cost = jax.jit(partial(model.apply, train=False)).lower(variables, x).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def member_cost(static: Static, n_train: int) -> float:
    """A member's training work, to balance whole groups over processes: its epochs x training
    samples x the network's forward FLOPs per sample (`forward_flops`)."""
    return static.epochs * n_train * forward_flops(static)


def memory_budget_of(total_bytes: int, platform: str) -> int:
    """The bytes a population may use on a device of `total_bytes`: 80 % of an accelerator's,
    half of a CPU's host RAM (the rest is the system's and the compiler's)."""
    return int(total_bytes * 0.8) if platform != "cpu" else total_bytes // 2


def device_memory(device) -> int:
    """Usable memory of `device` in bytes (`memory_budget_of` its allocator's limit, or of the
    host RAM on CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return memory_budget_of(stats["bytes_limit"], device.platform)
    return memory_budget_of(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "cpu")


def chunk_size(n_members: int, n_devices: int, member_bytes: int, budget: int,
               most: int | None = None, lanes: int = 1) -> int:
    """Members per chunk: a multiple of the device count (at least one member per device), at
    most what fits `budget` bytes per device and `most` members per device, and as even as the
    chunks allow: 8 members at most 3 at a time run as 3 + 3 + 2 (`chunk_sizes`). A group that
    needs more than one chunk is cut into a multiple of the `lanes` that train at once, where
    it has members enough, so that no round leaves a lane idle: with two lanes, 2 + 2 + 2 + 2."""
    per_device = min(max(1, budget // max(member_bytes, 1)), most or n_members)
    needed = -(-n_members // n_devices)  # members per device if all run at once (padded)
    chunks = -(-needed // per_device)
    if chunks > 1:  # a last round with a lane idle lasts as long as a full one (NOTES §24)
        chunks = min(needed, -(-chunks // lanes) * lanes)
    return -(-needed // chunks) * n_devices


def plan_chunks(static: Static, n_members: int, devices: list, n_train: int, budget: int,
                lanes: int = 1) -> int:
    """Members per chunk (`chunk_size`) for `n_members` of one static group on `devices`, each
    with `budget` bytes, shared by the `lanes` chunks that train at once (`cpu_lanes`); on a CPU
    also within its cache (`cpu_members_per_chunk`)."""
    most = cpu_members_per_chunk(static, lanes) if devices[0].platform == "cpu" else None
    return chunk_size(n_members, len(devices), bytes_per_member(static, n_train),
                      budget // lanes, most, lanes)


# Chunks a CPU trains at once. A small step's batched dots (FC and CNN members, the LC's layers
# at batch 16) run on one core each, so a second chunk from a second thread fills the other:
# on 2 cores, two chunks at once trained 64 FC members 1.6x as fast and two LC members at
# batch 32 1.2x (results/bench/NOTES.md §20). More lanes on more cores are not measured.
CPU_LANES = 2


def cpu_lane_limit() -> int:
    """The most chunks a CPU of this machine trains at once: `CPU_LANES`, or its cores (those
    this process may run on) where fewer."""
    return min(CPU_LANES, len(os.sched_getaffinity(0)))


def cpu_lanes(static: Static, devices: list, n_train: int, budget: int) -> int:
    """How many chunks of one static group train at once: `cpu_lane_limit()` on one CPU device
    of this process, where that many members fit `budget` bytes together; else one."""
    if (len(devices) > 1 or devices[0].platform != "cpu"
            or devices[0].process_index != jax.process_index()):
        return 1
    lanes = cpu_lane_limit()
    return lanes if lanes * bytes_per_member(static, n_train) <= budget else 1


def plan_group(static: Static, n_members: int, devices: list, n_train: int,
               budget: int) -> tuple[int, int]:
    """How `n_members` of one static group train on `devices` with `budget` bytes each: members
    per chunk (`plan_chunks`) and chunks at once (`cpu_lanes`, at most the chunks there are)."""
    lanes = cpu_lanes(static, devices, n_train, budget)
    size = plan_chunks(static, n_members, devices, n_train, budget, lanes)
    return size, min(lanes, -(-n_members // size))


def concurrently(calls: list[Callable]) -> list:
    """Run `calls` (functions of no arguments returning JAX arrays) at once, each in a thread of
    its own, and return their results in order, computed. The threads are waited for in Python,
    so that Ctrl-C and SIGTERM, whose handlers run only in Python code, stop the caller at once.
    One call runs in this thread, dispatched only (`_wait` for its result)."""
    if len(calls) == 1:
        return [calls[0]()]
    results, errors = [None] * len(calls), []

    def run(i):
        try:
            results[i] = jax.block_until_ready(calls[i]())
        except BaseException as e:  # raised again in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.05)
    if errors:
        raise errors[0]
    return results


def chunk_sizes(n_members: int, size: int, n_devices: int) -> list[int]:
    """The padded size of each chunk of `size` members: the last holds the rest, padded to a
    multiple of the device count. At most two distinct sizes: two compiled programs."""
    return [-(-min(size, n_members - lo) // n_devices) * n_devices
            for lo in range(0, n_members, size)]


def _checkpoints(folder: Path, processes: list[int]):
    """The manager of a chunk's per-epoch checkpoints in `folder` (the latest two kept, so that a
    damaged latest one leaves the one before), saved by the `processes` that hold its devices,
    each its own shards: orbax's, or where one process of several holds the chunk,
    `OneProcessCheckpoints` (orbax writes a host's own arrays from the job's first process
    only). Both write each epoch to a temporary folder and rename it when complete, so an
    interrupted save leaves the previous epoch intact."""
    folder.mkdir(parents=True, exist_ok=True)  # orbax leaves that to us with active_processes
    if len(processes) == 1 and jax.process_count() > 1:
        return OneProcessCheckpoints(folder)
    import orbax.checkpoint as ocp
    sync = ocp.options.MultiprocessingOptions(
        primary_host=processes[0], active_processes=set(processes),
        barrier_sync_key_prefix=re.sub(r"\W", "_", str(folder)))
    return ocp.CheckpointManager(folder.absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=CHECKPOINTS_KEPT, enable_async_checkpointing=False,
        multiprocessing_options=sync, create=False))


class OneProcessCheckpoints:
    """A chunk's per-epoch checkpoints kept by the one process of a multi-process run that holds
    it, with the part of orbax's `CheckpointManager` that `population` uses: each epoch one
    `state.npz` of the checkpointed tree's leaves in `directory/EPOCH/`."""

    def __init__(self, directory: Path):
        self.directory = directory

    def all_steps(self) -> list[int]:
        """The epochs saved, in no order."""
        return [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]

    def save(self, epoch: int, tree) -> None:
        """Write `tree` (numpy leaves) as epoch `epoch`, then drop all but the latest
        `CHECKPOINTS_KEPT` epochs."""
        temporary = self.directory / f"{epoch}{UNFINISHED}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        with open(temporary / "state.npz", "wb") as f:
            np.savez(f, *jax.tree.leaves(tree))
        shutil.rmtree(self.directory / str(epoch), ignore_errors=True)
        os.replace(temporary, self.directory / str(epoch))
        for old in sorted(self.all_steps())[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(self.directory / str(old))

    def restore(self, step: int, template):
        """Epoch `step`, shaped as `template`; ValueError if its leaves do not fit it."""
        leaves, tree = jax.tree.flatten(template)
        with np.load(self.directory / str(step) / "state.npz") as f:
            saved = [f[f"arr_{i}"] for i in range(len(f.files))]
        if [(a.shape, a.dtype) for a in saved] != [(np.shape(x), x.dtype) for x in leaves]:
            raise ValueError("its arrays are not those of this chunk")
        return jax.tree.unflatten(tree, saved)

    def close(self) -> None:
        """Nothing to release (orbax's manager has threads to stop)."""


def _sha256(path: Path) -> str:
    """The SHA-256 of the file `path`, in hex."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_manifest(folder: Path) -> None:
    """ValueError, naming the first file that differs, unless every file the manifest of the
    epoch `folder` lists is there with the bytes it was saved with."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"no readable {MANIFEST} ({_one_line(e)})") from None
    for name, digest in listed.items():
        if not (folder / name).is_file():
            raise ValueError(f"{name}: missing")
        if _sha256(folder / name) != digest:
            raise ValueError(f"{name}: not the bytes saved (SHA-256 differs)")


def _remove(paths, processes: list[int], name: str) -> None:
    """Remove the folders `paths` by the first of `processes`; the others wait until it has."""
    if jax.process_index() == processes[0]:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
    if len(processes) > 1:
        distributed.barrier(name)


def _together(processes: list[int], error: str | None, kind: type[Exception],
              failed: str) -> None:
    """Raise `kind(error)` where this process has an `error`; where a chunk is held by several
    `processes`, raise on the others too (a line naming the one that `failed`), so that none
    waits for it at the next collective until the runtime gives up (minutes)."""
    if len(processes) > 1:
        distributed.agree(error, kind, failed)
    elif error is not None:
        raise kind(error)


@contextlib.contextmanager
def _stops_deferred():
    """Within the block, Ctrl-C and SIGTERM wait for it to end and then act as they would have:
    a checkpoint being written is finished, not cut off inside orbax (whose event loop, cut off
    in the main thread, leaves a traceback behind). Only the main thread receives them; elsewhere
    the block changes nothing."""
    stops = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    if threading.current_thread() is not threading.main_thread():
        stops = []
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in caught[:1]:
            signal.raise_signal(s)


def _save_epoch(manager, epoch: int, state, curves, processes: list[int]) -> None:
    """Checkpoint a chunk after `epoch` epochs: its state and its curves so far, then (by the
    first of the `processes` that hold it) the manifest of its files. Arrays sharded over
    several processes are saved shard by shard; those on one process's devices go as numpy
    (orbax refuses such host-local arrays when there are several processes). OSError (or
    orbax's own error) where a write fails; a lack of room or a failed manifest on one of
    several processes raises on all."""
    state = jax.tree.map(lambda x: np.asarray(x) if x.is_fully_addressable else x,
                         distributed.raw_keys(state))
    tree = {"state": state, "curves": curves}
    # Refused before a byte is written: orbax, failing part way, leaves tracebacks from its
    # threads behind, and the epoch it was writing would be lost anyway.
    need = sum(x.nbytes for x in jax.tree.leaves(tree))
    free = shutil.disk_usage(manager.directory).free
    _together(processes, f"{os.strerror(errno.ENOSPC)}: {need:,} bytes needed, {free:,} free"
              if free < need else None, OSError, "has no room for it")
    if isinstance(manager, OneProcessCheckpoints):
        manager.save(epoch, tree)
    else:
        import orbax.checkpoint as ocp
        manager.save(epoch, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()
    error = None
    if jax.process_index() == processes[0]:
        folder = Path(manager.directory) / str(epoch)
        temporary = folder / f"{MANIFEST}.tmp"
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != temporary.name)
        try:
            temporary.write_text(json.dumps({p.relative_to(folder).as_posix(): _sha256(p)
                                             for p in files}, indent=1))
            os.replace(temporary, folder / MANIFEST)
        except OSError as e:
            error = _one_line(e)
    _together(processes, error, OSError, "could not write its manifest")


def _restore_epoch(manager, step: int, state, curves):
    """A chunk's checkpoint after epoch `step`, laid out (sharded) as `state`, and its curves;
    ValueError if a file of it is not as saved (`_check_manifest`)."""
    _check_manifest(Path(manager.directory) / str(step))
    raw = distributed.raw_keys(state)
    template = {"state": jax.tree.map(
        lambda x: np.empty(x.shape, x.dtype) if x.is_fully_addressable
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), raw), "curves": curves}
    if isinstance(manager, OneProcessCheckpoints):
        saved = manager.restore(step, template)
    else:
        import orbax.checkpoint as ocp
        saved = manager.restore(step, args=ocp.args.StandardRestore(template))
    placed = jax.tree.map(lambda r, x: jax.device_put(r, x.sharding) if x.is_fully_addressable
                          else r, saved["state"], raw)
    return distributed.typed_keys(placed, state), np.array(saved["curves"])


def _write_done(path: Path, out: dict) -> str | None:
    """Write a finished chunk's results `out` to `path` (whole or not at all): None, or the
    one-line error that says why it could not."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **out)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return (f"{path}: cannot write ({_one_line(e)}); the chunk's checkpoints are kept: "
                "free space, then run the same command with --resume")
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def _restore_latest(folder: Path, processes: list[int], state, curves, warn: Callable):
    """(manager, state, curves) from the newest epoch of `folder` that restores. A damaged
    epoch (any file of it truncated, missing or overwritten) is said in one line to `warn`,
    removed, and the one before is tried, each with a fresh manager (a failed restore can leave
    orbax's in a state that refuses the next); InputError, naming the folder, when none
    restores. An epoch whose save was cut short is removed unsaid. A chunk that has no
    checkpoint yet is returned as it is."""
    steps = []
    try:
        # An epoch whose save a stop cut short: nothing of it to keep.
        _remove([*folder.glob(f"*{UNFINISHED}*"), *folder.glob("*.orbax-checkpoint-tmp*")],
                processes, f"{folder} unfinished epochs removed")
        manager = _checkpoints(folder, processes)
        steps = sorted(manager.all_steps(), reverse=True)
        for step in steps:
            try:
                return manager, *_restore_epoch(manager, step, state, curves)
            except Exception as e:  # orbax, tensorstore, zstd, json: whatever damage raises
                before = [s for s in steps if s < step]
                warn(f"{folder}/{step}: the checkpoint of epoch {step} is damaged "
                     f"({_one_line(e)}); " + (f"resuming from epoch {before[0]}" if before
                                              else "no earlier epoch is kept"))
                manager.close()
                _remove([folder / str(step)], processes, f"{folder}/{step} removed")
                manager = _checkpoints(folder, processes)
    except Exception as e:  # orbax reading its own metadata: any damage at all
        raise InputError(f"{folder}: the checkpoint is damaged ({_one_line(e)}); remove "
                         f"{folder.parent.parent}/ to start again") from None
    if steps:
        raise InputError(f"{folder}: no checkpoint restores (epochs {', '.join(map(str, steps))} "
                         f"damaged); remove {folder.parent.parent}/ to start again")
    return manager, state, curves


def _load_done(path: Path, warn: Callable) -> dict | None:
    """A finished chunk's results, or None (said to `warn`, and the file removed) when the
    file is damaged: the chunk is then trained again, to the same numbers."""
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # zipfile, zlib, numpy's format checks: whatever the damage raises
        warn(f"{path}: damaged ({_one_line(e)}); training that chunk again")
        path.unlink(missing_ok=True)
        return None


def _wait(tree, poll_s: float = 0.05):
    """`tree` once computed, waited for in Python: a blocking wait inside XLA would hold off
    Ctrl-C and SIGTERM, whose handlers run only in Python code, for a whole epoch."""
    leaves = [jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
              for x in jax.tree.leaves(tree)]
    while not all(x.is_ready() for x in leaves):
        time.sleep(poll_s)
    return tree


def _pad(tree, size: int):
    """Pad the member axis to `size` by repeating the last member (padding is discarded)."""
    def pad(x):
        extra = size - x.shape[MEMBER_AXIS]
        return jnp.concatenate([x, jnp.repeat(x[-1:], extra, MEMBER_AXIS)]) if extra else x
    return jax.tree.map(pad, tree)


@dataclass(frozen=True)
class GroupResult:
    """What `run_group` returns for the M members of one static group, numpy only."""

    curves: np.ndarray      # float32 (M, epochs, metrics), metrics as `train.metric_names`
    diverged: np.ndarray    # int32 (M,): the 1-based epoch a member diverged in, 0 if never
    test_probs: np.ndarray  # float32 (M, N_test, 10): the final softmax on the test set
    # float32 (M, len(attacks.ATTACKS), len(eps)): accuracy under attack; (M, 0, 0) without
    robust: np.ndarray
    chunks: int             # the chunks of members, trained `lanes` at a time
    chunk_members: int      # members per chunk (padding to a multiple of the devices included)
    lanes: int = 1          # chunks trained at once (`cpu_lanes`)


def run_group(static: Static, keys: jax.Array, hps: Hparams, data: Data, *,
              devices: list | None = None, memory_budget: int | None = None,
              evaluation: Evaluation = Evaluation(), checkpoint: Path | None = None,
              on_epoch: Callable | None = None, on_step: Callable | None = None,
              warn: Callable = print) -> "GroupResult":
    """Train the members `(keys, hps)` (leading axis `MEMBER_AXIS`) of one static group and
    return their `GroupResult`. Chunks train `cpu_lanes` at a time, each epoch of the chunks
    training at once together. `on_epoch(info)` is called after each chunk's epoch with a dict
    (epoch, epochs, members, chunk, chunks, lanes: the chunks training at once, seconds: their
    epoch's, members_per_device: how the member axis of the parameters is laid out over the
    devices). `on_step(info)`, if given, is called from inside each epoch (`train.train_steps`)
    about every `STEP_CALL_SECONDS` (the first epoch: every sixteenth of its steps) with a dict
    (epoch, epochs, step, steps, members: of the chunks training at once, chunk: the first of
    them, chunks, lanes, seconds since the epoch began).
    With `checkpoint` (a folder on a file system every process sees), each chunk's state is
    saved after every epoch and a run that finds one resumes from it; a finished chunk keeps only
    its results, written by the first of the processes that trained it. A damaged checkpoint is
    said to `warn` in one line, by the first of the processes that train the group, and the
    epoch before is resumed (`_restore_latest`).
    """
    devices = devices or jax.devices()
    # The processes whose devices train this group; the first writes its finished chunks and
    # says what it finds damaged (every one of them finds it).
    processes = sorted({d.process_index for d in devices})
    say = warn if jax.process_index() == processes[0] else lambda message: None
    n_members = keys.shape[MEMBER_AXIS]
    n_train = data.x_train.shape[0]
    budget = memory_budget or device_memory(jax.local_devices()[0])
    size, lanes = plan_group(static, n_members, devices, n_train, budget)
    n_chunks = -(-n_members // size)
    mesh = Mesh(np.array(devices), ("member",))
    by_member = NamedSharding(mesh, PartitionSpec("member"))
    replicated = NamedSharding(mesh, PartitionSpec())
    data = distributed.put(data, replicated)
    n_metrics = len(train.metric_names(data.x_val is not None))

    init = jax.jit(jax.vmap(partial(train.init_member, static, n_train=n_train)),
                   out_shardings=by_member)
    steps = n_train // static.batch_size
    # Where the running epoch is, for `on_step`: set here, read by the callback from the loop.
    running = {"epoch": 0, "chunk": 0, "members": 0, "lanes": 1, "t0": 0.0, "step": 0}

    def tick(step):
        step = int(step)
        if step <= running["step"]:
            return  # each device, and each chunk training at once, calls back; report once
        running["step"] = step
        on_step({"epoch": running["epoch"], "epochs": static.epochs, "step": step,
                 "steps": steps, "members": running["members"], "chunk": running["chunk"],
                 "chunks": n_chunks, "lanes": running["lanes"],
                 "seconds": time.perf_counter() - running["t0"]})

    epoch_fn = jax.jit(jax.vmap(partial(train.train_epoch, static,
                                        on_step=tick if on_step else None),
                                in_axes=(0, 0, None, None)),
                       out_shardings=(by_member, by_member), donate_argnums=0)
    every = max(1, steps // 16)
    eps = jnp.asarray(evaluation.attack_eps, jnp.float32)
    n_att = evaluation.attack_samples

    def final_eval(state, hp):
        _, _, probs = train.evaluate(static, state, hp, data.x_test, data.y_test)
        robust = (robust_accuracy(static, state, hp, data.x_test[:n_att], data.y_test[:n_att],
                                  eps) if len(evaluation.attack_eps) else jnp.zeros((0, 0)))
        return probs, robust

    final = jax.jit(jax.vmap(final_eval))
    results, compiled, inits = {}, {}, {}  # results by chunk; programs per padded chunk size

    def start(c: int, padded: int) -> dict | None:
        """Chunk `c` ready to train (its state initialized or restored, its program compiled),
        or None where it finished before (its results kept)."""
        lo, hi = c * size, min((c + 1) * size, n_members)
        done_path = checkpoint / f"chunk{c}.done.npz" if checkpoint else None
        done = _load_done(done_path, say) if done_path and done_path.exists() else None
        if done is not None:
            results[c] = done
            return None
        k_chunk = distributed.put(_pad(keys[lo:hi], padded), by_member)
        hp_chunk = distributed.put(_pad(jax.tree.map(lambda x: x[lo:hi], hps), padded), by_member)
        if padded not in inits:
            inits[padded] = train.compile_program(init, k_chunk, hp_chunk,
                                                  platform=devices[0].platform, once=True)
        state = inits[padded](k_chunk, hp_chunk)
        curves = np.full((padded, static.epochs, n_metrics), np.nan, np.float32)
        manager = None
        if checkpoint:
            manager, state, curves = _restore_latest(checkpoint / f"chunk{c}", processes,
                                                     state, curves, say)
        if padded not in compiled:  # ahead, so that an epoch's clock times training only
            compiled[padded] = train.compile_program(epoch_fn, state, hp_chunk, data,
                                                     jnp.int32(every), platform=devices[0].platform)
        return {"c": c, "lo": lo, "hi": hi, "padded": padded, "hp": hp_chunk, "state": state,
                "curves": curves, "manager": manager, "done_path": done_path,
                "epoch": int(distributed.to_host(state.epoch)[0])}

    def finish(lane: dict) -> None:
        """The final evaluation of a trained chunk, its results kept (and written, with a
        checkpoint, in place of its per-epoch checkpoints)."""
        c, n = lane["c"], lane["hi"] - lane["lo"]
        probs, robust = final(lane["state"], lane["hp"])
        out = {"curves": lane["curves"][:n],
               **{k: distributed.to_host(v)[:n] for k, v in
                  (("diverged", lane["state"].diverged), ("test_probs", probs),
                   ("robust", robust))}}
        if lane["done_path"]:
            done_path, error = lane["done_path"], None
            lane["manager"].close()
            if jax.process_index() == processes[0]:
                error = _write_done(done_path, out)
                if error is None:
                    shutil.rmtree(checkpoint / f"chunk{c}")
            _together(processes, error, WriteError,
                      f"could not write {done_path.name}; its checkpoints are kept: free space, "
                      "then run the same command with --resume")
        results[c] = out

    # Chunks in order, `lanes` at a time: each round trains one epoch of every running chunk
    # at once; a finished chunk makes room for the next.
    waiting, running_lanes = list(enumerate(chunk_sizes(n_members, size, len(devices)))), []
    while waiting or running_lanes:
        while waiting and len(running_lanes) < lanes:
            lane = start(*waiting.pop(0))
            if lane is not None:
                running_lanes.append(lane)
        for lane in [lane for lane in running_lanes if lane["epoch"] >= static.epochs]:
            finish(lane)
            running_lanes.remove(lane)
        if not running_lanes:
            continue
        t0 = time.perf_counter()
        first = running_lanes[0]
        running.update(epoch=first["epoch"] + 1, chunk=first["c"] + 1, t0=t0, step=0,
                       members=sum(lane["hi"] - lane["lo"] for lane in running_lanes),
                       lanes=len(running_lanes))
        outputs = _wait(concurrently([partial(compiled[lane["padded"]], lane["state"],
                                              lane["hp"], data, jnp.int32(every))
                                      for lane in running_lanes]))
        seconds = time.perf_counter() - t0
        # Space the next epoch's calls from this one's pace (a traced count: same program).
        every = max(1, int(steps * STEP_CALL_SECONDS / seconds))
        for lane, (state, metrics) in zip(running_lanes, outputs):
            lane["state"], epoch = state, lane["epoch"]
            lane["curves"][:, epoch] = distributed.to_host(metrics)
            lane["epoch"] = epoch + 1
            if lane["manager"]:
                try:
                    with _stops_deferred():
                        _save_epoch(lane["manager"], epoch + 1, state, lane["curves"],
                                    processes)
                except Exception as e:  # the file system, orbax, tensorstore: a full disk
                    raise WriteError(
                        f"{checkpoint}/chunk{lane['c']}: cannot write the checkpoint of epoch "
                        f"{epoch + 1} ({_one_line(e)}); the epochs before it are kept: free "
                        "space, then run the same command with --resume") from None
            if on_epoch:
                leaf = jax.tree.leaves(state.params)[0]
                on_epoch({"epoch": epoch + 1, "epochs": static.epochs,
                          "members": lane["hi"] - lane["lo"], "chunk": lane["c"] + 1,
                          "chunks": n_chunks, "lanes": len(running_lanes), "seconds": seconds,
                          "members_per_device": [s.data.shape[MEMBER_AXIS]
                                                 for s in leaf.addressable_shards]})
    results = [results[c] for c in range(n_chunks)]
    return GroupResult(**{k: np.concatenate([r[k] for r in results]) for k in results[0]},
                       chunks=n_chunks, chunk_members=size, lanes=lanes)
