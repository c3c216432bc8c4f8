"""One sweep over several processes (one per host, or several on one machine) with JAX's
multi-controller runtime (`jax.distributed`).

Every process runs the same command; together their devices form one mesh over which
`population` shards the member axis. Arrays that span the processes come back to the host with
`to_host` (an all-gather), so every process holds the same results; only the writer (process
0) writes results and prints progress. A process learns where the coordinator is from JAX's own
cluster detection (Slurm, TPU pods, Open MPI), from flags, or from the environment variables
in `ENV`. On CPU the collectives run over gloo.
"""

import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass

import jax
import numpy as np

from uspsjax.errors import InputError

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
INIT_TIMEOUT_S = 300  # JAX's own default wait for every process to join
# How long the others wait for a silent process before the runtime stops them (JAX's default,
# 100 s, leaves survivors of a crash idle for minutes; a training step never blocks heartbeats,
# which a thread of JAX's runtime sends).
HEARTBEAT_TIMEOUT_S = 20


@dataclass(frozen=True)
class Launch:
    """Where a process finds the others: all three of coordinator (HOST:PORT), process count and
    id, or none of them (JAX's cluster detection), and how long it waits for them."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = INIT_TIMEOUT_S
    heartbeat_s: int = HEARTBEAT_TIMEOUT_S


def _int_setting(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{name}: expected an integer, got {text!r}") from None


def launch_settings(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, timeout_s: int = INIT_TIMEOUT_S,
                    environ=os.environ, heartbeat_s: int = HEARTBEAT_TIMEOUT_S) -> Launch:
    """The `Launch` from flags, each missing one taken from its variable in `ENV`. InputError
    when only some are given, the address is not HOST:PORT, or the id is not below the count."""
    given = {"coordinator": coordinator, "num_processes": num_processes,
             "process_id": process_id}
    for key, var in ENV.items():
        if given[key] is None and environ.get(var):
            given[key] = environ[var] if key == "coordinator" else _int_setting(var,
                                                                                environ[var])
    if all(v is None for v in given.values()):
        return Launch(timeout_s=timeout_s, heartbeat_s=heartbeat_s)
    missing = [f"--{k.replace('_', '-')} (or {ENV[k]})" for k, v in given.items() if v is None]
    if missing:
        raise InputError(f"a plain launch needs the coordinator, the process count and the "
                         f"process id; missing {', '.join(missing)}")
    address = given["coordinator"]
    match = re.fullmatch(r"(.+):(\d+)", address)
    if not match or not 0 < int(match[2]) < 65536:
        raise InputError(f"coordinator {address!r}: expected HOST:PORT")
    n, i = given["num_processes"], given["process_id"]
    if n < 1 or not 0 <= i < n:
        raise InputError(f"process id {i} of {n} processes: expected 0 <= id < count")
    return Launch(address, n, i, timeout_s, heartbeat_s)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once the coordinator at HOST:PORT accepts a connection; InputError after
    `timeout_s` (JAX's own wait ends the process with a C++ stack trace instead)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise InputError(f"cannot reach the coordinator at {address} within "
                                 f"{timeout_s:g} s ({e.strerror or e})") from None
            time.sleep(0.2)


def initialize(launch: Launch) -> None:
    """Join the other processes (before anything touches a JAX device). Process 0 hosts the
    coordinator; the others first check that they can reach it."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch.coordinator and launch.process_id:
        wait_for_coordinator(launch.coordinator, launch.timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=launch.coordinator,
                                   num_processes=launch.num_processes,
                                   process_id=launch.process_id,
                                   initialization_timeout=launch.timeout_s,
                                   heartbeat_timeout_seconds=launch.heartbeat_s)
    except (RuntimeError, ValueError) as e:
        if launch.coordinator is None:  # JAX found no cluster (Slurm, Open MPI, ...) to join
            raise InputError("--distributed: no cluster launcher found (Slurm, Open MPI, a "
                             "Cloud TPU); give --coordinator HOST:PORT, --num-processes and "
                             "--process-id (or " + ", ".join(ENV.values()) + ")") from None
        raise InputError(f"--distributed: {' '.join(str(e).split())}") from None


def is_writer() -> bool:
    """Whether this process writes results, checkpoint bookkeeping and progress (process 0)."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A (possibly sharded over several processes) array as one numpy array, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def raw_keys(tree):
    """`tree` with typed PRNG keys as their raw data (what a transfer or checkpoint carries)."""
    return jax.tree.map(lambda x: jax.random.key_data(x)
                        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def typed_keys(raw, like):
    """Undo `raw_keys`, taking the key types from `like`."""
    return jax.tree.map(lambda r, x: jax.random.wrap_key_data(r, impl=jax.random.key_impl(x))
                        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else r, raw, like)


def put(tree, sharding):
    """Place host values (the same on every process) on `sharding`, typed PRNG keys included."""
    placed = jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), raw_keys(tree))
    return typed_keys(placed, tree)


def gather(x) -> np.ndarray:
    """Every process's host array `x` (the same shape on each), stacked: `(processes, ...)`."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def agree(error: str | None, kind: type[Exception] = InputError,
          failed: str = "refused its input") -> None:
    """Raise `kind` on every process when any process has an `error` (its own message, or a
    line naming the first process that `failed`), so that all stop alike rather than wait on
    the one that stopped at their next collective."""
    refused = gather(np.int32(error is not None))
    if error is None and refused.any():
        error = f"process {int(np.argmax(refused))} of {refused.size} {failed}"
    if error is not None:
        raise kind(error)


def agree_on(parts: dict) -> None:
    """Raise InputError on every process unless all were started alike: `parts` maps a name to
    a JSON-able value (the sweep text, the flags, the data's hash...), compared by digest
    before anything trains. The message names the first part and process that differ."""
    if jax.process_count() == 1:
        return
    digests = np.stack([np.frombuffer(hashlib.sha256(json.dumps(
        v, sort_keys=True, default=str).encode()).digest(), np.uint8) for v in parts.values()])
    every = gather(digests)
    for process in range(1, len(every)):
        for k, name in enumerate(parts):
            if not np.array_equal(every[process, k], every[0, k]):
                raise InputError(f"process {process} was started with other {name} than "
                                 "process 0; start every process with the same command, sweep "
                                 "files and data")


def agree_status(code: int) -> int:
    """The exit status every process returns: the worst (highest) of all processes' `code`."""
    return int(gather(np.int32(code)).max())
