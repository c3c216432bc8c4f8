"""Where a training step's time goes: per-XLA-operation times of one benchmark configuration.

    python -m uspsjax.profile lc --batch-size 16
    python -m uspsjax.profile fc --batch-size 16 --population 64 --steps 20

Compiles the program `uspsjax.bench` times (S training steps of P members under `lax.scan`),
runs it once to warm up, once more under `jax.profiler.trace`, and prints the operations that
took the most time per step, each with its output shape and the JAX operation it came from.
"""

import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

from uspsjax import bench, cli, train
from uspsjax.models import NETWORKS

_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([^,}\s]+)")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Each instruction of optimized HLO text: name -> (output type, JAX op_name or ""). A
    fusion without an op_name of its own takes the first one inside the computation it calls."""
    ops, calls, first_source, computation = {}, {}, {}, None
    for line in hlo_text.splitlines():
        if m := _COMPUTATION.match(line):
            computation = m.group(1)
        elif m := _HLO_LINE.match(line):
            source = _OP_NAME.search(line)
            ops[m.group(1)] = (m.group(2), source.group(1) if source else "")
            if source:
                first_source.setdefault(computation, source.group(1))
            if called := _CALLS.search(line):
                calls[m.group(1)] = called.group(1)
    return {name: (shape, source or (first_source.get(calls[name], "") if name in calls else ""))
            for name, (shape, source) in ops.items()}


def op_times(trace_dir: Path, names) -> tuple[collections.Counter, list[tuple[float, float]]]:
    """Microseconds spent in each operation of `names`, summed over a perfetto trace's events,
    and each event's (start, end) in microseconds."""
    trace_file = next(trace_dir.glob("**/perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(trace_file.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals, spans = collections.Counter(), []
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            totals[e["name"]] += e.get("dur", 0)
            spans.append((e["ts"], e["ts"] + e.get("dur", 0)))
    return totals, spans


def concurrency(spans) -> tuple[float, float]:
    """How long at least one of the (start, end) spans runs, and how long two or more run at
    once: XLA:CPU runs independent operations side by side, so their summed times overlap."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    busy = together = 0.0
    running, last = 0, None
    for time_, change in edges:
        if last is not None:
            busy += (time_ - last) * (running >= 1)
            together += (time_ - last) * (running >= 2)
        running, last = running + change, time_
    return busy, together


def profile(network: str, batch_size: int, population: int, steps: int, dtype: str, data):
    """Profile one configuration. Returns (wall seconds of the traced call, [(op, seconds per
    step, output type, source)] from slowest to fastest, (seconds per step with at least one
    operation running, with two or more))."""
    static, hparams = bench.bench_setup(network, batch_size, dtype)
    compiled, state, hp, _, _ = bench.build_population(static, hparams, data, population, steps)
    batches = bench.member_batches(data.x_train.shape[0], population, steps, batch_size)
    ops = hlo_ops(compiled.as_text())
    state = jax.block_until_ready(compiled(state, hp, batches, data)[0])  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            jax.block_until_ready(compiled(state, hp, batches, data)[0])
        wall = time.perf_counter() - t0
        totals, spans = op_times(Path(tmp), ops)
    rows = [(name, us / 1e6 / steps, *ops[name]) for name, us in totals.most_common()]
    return wall, rows, tuple(us / 1e6 / steps for us in concurrency(spans))


@cli.command
def main(argv=None) -> int:
    """Entry point; returns the exit status (2 for bad input, with a one-line error)."""
    p = cli.Parser(prog="python -m uspsjax.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("network", choices=list(NETWORKS))
    p.add_argument("--batch-size", type=cli.positive_int, default=16)
    p.add_argument("--population", type=cli.positive_int, default=1, help="members (default 1)")
    p.add_argument("--steps", type=cli.positive_int, default=4, help="training steps per call")
    p.add_argument("--top", type=cli.positive_int, default=15, help="operations to list")
    p.add_argument("--dtype", choices=train.DTYPES, default="float32")
    p.add_argument("--data", help="the USPS h5 file (default: as `uspsjax.sweep`)")
    args = p.parse_args(argv)
    data = bench.load_data(args.data, [args.batch_size], "--batch-size")
    wall, rows, (busy, together) = profile(args.network, args.batch_size, args.population,
                                           args.steps, args.dtype, data)
    step = wall / args.steps
    print(f"{args.network} batch {args.batch_size}, {args.population} member(s): "
          f"{1e3 * step:.1f} ms per step (traced), {1e3 * sum(r[1] for r in rows):.1f} ms in "
          f"XLA operations; {1e3 * busy:.1f} ms with one or more running, {1e3 * together:.1f} "
          f"ms with two or more")
    print("| ms/step | % of step | operation | output | from |\n|---:|---:|---|---|---|")
    for name, seconds, shape, source in rows[:args.top]:
        print(f"| {1e3 * seconds:.2f} | {100 * seconds / step:.1f} | {name} | {shape} | "
              f"{source.replace('jit(run_steps)/vmap()/while/body/closed_call/', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
