"""Benchmark the training engine on the current device and set it against the device's own peaks.

    python -m uspsjax.bench            # fc, cnn, lc x batch 16/128/1024 x P members
    python -m uspsjax.bench --quick    # a small grid (< 2 min on a 2-core CPU)

Each row times S training steps (`train.train_step` under `lax.scan`, each member on its own
shuffle of real data) of P members, after a warm-up call, as `population.run_group` runs them:
jitted programs vmapped over chunks of members (`population.plan_group`: on a CPU, as many members
as its cache holds, two chunks at once where the cores allow). It reports member-samples/s,
achieved FLOP/s from an analytic count, compile time, memory, the share of the matmul peak, the
bound that applies to the row (`row_bound`: the matmul peak, or the weight traffic of ~9 passes per
step, or on CPU the matmul peak with the grouped patch convolutions of `conv_general_dilated_local`
counted) and the share of it reached, and for P > 1 the speed-up over the same P members trained
one at a time with the P=1 program. Peaks are measured in the same run. LC rows record the lowering
their layers ran (`--lc-lowering`, the static setting `lc_lowering`); every row the samples a step
works through at a time (`--microbatch`, `train.microbatch_size`).
Writes `OUT/<device>.json` and `OUT/<device>.md` and prints the table.
"""

import functools
import json
import math
import re
import resource
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from uspsjax import cli, machine, population, train
from uspsjax.errors import InputError
from uspsjax.models import (LC, LC_LOWERING_NAMES, LC_LOWERINGS, NETWORKS, count_params,
                            lc_lowering_name)
from uspsjax.grid import expand, load_sweep, split_settings
from uspsjax.machine import environment

# (batch sizes, populations) per network; the LC net has 100x the weights, so fewer members.
# A network without its own row here (a new one) gets the FC's and the CNN's grid.
FULL_GRID = {"fc": ((16, 128, 1024), (1, 8, 64)), "cnn": ((16, 128, 1024), (1, 8, 64)),
             "lc": ((16, 128, 1024), (1, 2, 8))}
QUICK_GRID = {"fc": ((16, 128), (1, 8)), "cnn": ((16, 128), (1, 8)), "lc": ((16,), (1,))}
# Weight-sized reads + writes per SGD step (DESIGN.md: forward, input and weight gradients,
# momentum, update).
WEIGHT_PASSES = 9
FLOOR_SWEEPS = ("init", "lr", "batch", "momentum")


def lc_layers() -> list[tuple[int, int, int]]:
    """`(L_out, C_in, F)` of each LocallyConnected1D layer of the LC net (kernel 3, valid)."""
    layers, length, channels = [], 256, 1
    for f in LC.filters:
        length -= 2
        layers.append((length, channels, f))
        channels = f
    return layers


@functools.cache  # lowering a network to count it takes a while, and the count never changes
def train_flops_per_sample(network: str) -> float:
    """Training FLOPs per sample: 3 forward passes' worth (forward, input and weight gradients)
    of XLA's count of the forward (`population.forward_flops`)."""
    return 3 * population.forward_flops(train.Static(network=network))


def grouped_patch_flops_per_sample(network: str) -> int:
    """FLOPs per sample of the forward's patch extraction in `conv_general_dilated_local` as
    XLA:CPU runs it, a grouped one-hot convolution made dense (DESIGN.md): L_out * (k * C_in)^2
    MACs per LC layer, ~394 MFLOP over the net. The input gradient's transposed convolutions are
    left out: measured, the reference step runs faster than it could if they were dense too
    (results/bench/NOTES.md, section 7). 0 for other networks."""
    if network != "lc":
        return 0
    return 2 * sum(l_out * (3 * c_in) ** 2 for l_out, c_in, _ in lc_layers())


def row_bound(network: str, batch_size: int, n_params: int, peaks: dict, platform: str,
              lc_lowering: str | None) -> dict:
    """The bounds on a row's member-samples/s and the one that applies (the lower): the matmul
    peak over the training FLOPs (plus the grouped patch FLOPs where `conv_general_dilated_local`
    runs on CPU), and the memory bandwidth over the weight traffic (`WEIGHT_PASSES` reads or
    writes of each member's float32 weights per step). Neither depends on the population: its
    members share the device."""
    flops = train_flops_per_sample(network)
    compute = "matmul peak"
    if lc_lowering == LC_LOWERING_NAMES["reference"] and platform == "cpu":
        flops += grouped_patch_flops_per_sample(network)
        compute = "matmul peak + grouped patches"
    steps_s = peaks["copy_bytes_per_s"] / (WEIGHT_PASSES * 4 * n_params)
    bounds = {compute: peaks["matmul_flop_per_s"] / flops, "weight traffic": batch_size * steps_s}
    name = min(bounds, key=bounds.get)
    return {"compute_bound_member_samples_per_s": bounds[compute],
            "bw_bound_member_steps_per_s": steps_s,
            "bound": name, "bound_member_samples_per_s": bounds[name]}


def device_slug(device) -> str:
    """A file name for the device: "cpu", or its kind as a slug ("nvidia-h100-80gb-hbm3")."""
    if device.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device.device_kind.lower()).strip("-") or device.platform


def time_calls(step, carry, repeats: int, target_s: float):
    """Seconds per call of `carry = step(carry)`: one warm-up call, then the best of `repeats`
    measurements, each of enough calls to last about `target_s` (one measurement when a single
    call already lasts 5 times that). Returns (seconds, carry)."""
    def run(carry, k):
        t0 = time.perf_counter()
        for _ in range(k):
            carry = step(carry)
        jax.block_until_ready(carry)
        return carry, time.perf_counter() - t0

    carry, first = run(carry, 1)
    k = max(1, math.ceil(target_s / max(first, 1e-6)))
    best = math.inf
    for _ in range(1 if first > 5 * target_s else repeats):
        carry, t = run(carry, k)
        best = min(best, t / k)
    return best, carry


def measure_peaks(device, dtype: str, repeats: int, target_s: float) -> dict:
    """The device's matmul FLOP/s (a large square matmul in `dtype`) and memory bandwidth (bytes
    read + written per second by an in-place `x + 1` on a large float32 array), measured now."""
    on_cpu = device.platform == "cpu"
    n = 2048 if on_cpu else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(jnp.matmul)
    t_mm, _ = time_calls(lambda _: matmul(a, a), None, repeats, target_s)
    x = jnp.zeros((256 if on_cpu else 1024) * 2**20 // 4, jnp.float32)
    # Donated, so it runs in place: a fresh 256 MB output each call would time the kernel's
    # page zero-filling (DESIGN.md), not the memory bus.
    add = jax.jit(lambda v: v + 1, donate_argnums=0)
    t_copy, _ = time_calls(add, x, repeats, target_s)
    return {"matmul_n": n, "matmul_dtype": dtype, "matmul_flop_per_s": 2 * n**3 / t_mm,
            "copy_bytes": 2 * x.nbytes, "copy_bytes_per_s": 2 * x.nbytes / t_copy}


def memory_high_water(device) -> tuple[int, str]:
    """The process's memory high-water mark in bytes, and what it is (it only ever grows)."""
    if device.platform == "cpu":  # Linux reports ru_maxrss in KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (ru_maxrss)"
    return (device.memory_stats() or {}).get("peak_bytes_in_use", 0), "peak_bytes_in_use"


def bench_setup(network: str, batch_size: int, dtype: str, lc_lowering: str = "auto",
                microbatch: int = 0):
    """The `Static` and hyperparameters the study trains `network` with (plain SGD, lr 1e-3, its
    own dropout), at this batch size and compute dtype, LC layers lowered as `lc_lowering`, the
    batch worked through `microbatch` samples at a time (0: as the platform prefers)."""
    settings = {**NETWORKS[network].defaults, "batch_size": batch_size, "dtype": dtype,
                "microbatch": microbatch,
                **({"lc_lowering": lc_lowering} if network == "lc" else {})}
    return split_settings(network, settings, where=f"bench {network}")


def run_steps(static: train.Static, state: train.MemberState, hp: train.Hparams,
              batches: jax.Array, data: train.Data):
    """`batches.shape[0]` training steps of one member on the sample indices `batches (S, B)`, as
    `train_epoch` runs them (`train.train_steps`). Returns the new state and the per-step losses."""
    state, (losses, _) = train.train_steps(static, state, hp, data, batches,
                                           jax.random.split(state.key, batches.shape[0]))
    return state, losses


def member_batches(n_train: int, members: int, steps: int, batch_size: int) -> jax.Array:
    """`(members, steps, batch_size)` sample indices: each member reads its own shuffle, so the
    gathers are as in real training."""
    order = [np.resize(np.random.default_rng(m).permutation(n_train), steps * batch_size)
             for m in range(members)]
    return jnp.asarray(np.stack(order).reshape(members, steps, batch_size), jnp.int32)


def build_population(static, hparams: dict, data: train.Data, members: int, steps: int):
    """Compile the program that trains `members` members for `steps` steps (member axis first,
    state donated as in `population.run_group`). Returns (compiled, state, hp, seconds to lower
    and compile, XLA's memory for the program in bytes)."""
    n = data.x_train.shape[0]
    keys = jnp.stack([population.member_key(m) for m in range(members)])
    hp = population.stack([train.make_hparams(**hparams)] * members)
    platform = data.x_train.devices().pop().platform
    state = train.init_members(static, keys, hp, n)
    batches = member_batches(n, members, steps, static.batch_size)
    fn = jax.jit(jax.vmap(partial(run_steps, static), in_axes=(0, 0, 0, None)), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = train.compile_program(fn, state, hp, batches, data, platform=platform)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - mem.alias_size_in_bytes) if mem is not None else None
    return compiled, state, hp, compile_s, xla_bytes


# Fewest steps per call: each call allocates its buffers afresh, which XLA:CPU pays for in page
# faults (NOTES §14: the CNN at batch 1024, 2 steps a call, ran 0.78x of a whole epoch's 7).
# Training calls one program per epoch, so the bench's calls are at least this long, or an epoch.
MIN_STEPS = 8


def choose_steps(flops_per_step: float, peak: float, quick: bool, epoch_steps: int) -> int:
    """Steps per call: enough that one call lasts ~0.1 s (0.3 s in a full run) at a third of the
    matmul peak, so per-call costs are amortized, at most 10 (20), and at least `MIN_STEPS` or
    the `epoch_steps` of one epoch, whichever is fewer: what one call of training runs."""
    target, cap = (0.1, 10) if quick else (0.3, 20)
    low = min(MIN_STEPS, epoch_steps)
    return int(np.clip(round(target * peak / 3 / flops_per_step), low, max(low, cap)))


def measure_chunks(programs: dict, batches, data, size: int, lanes: int, repeats: int,
                   target_s: float):
    """Seconds to train the members of `batches (P, S, B)` as `population.run_group` does on one
    device: chunks of `size` members, `lanes` at a time (`population.concurrently`),
    `programs[n] = (compiled, states, hp)` the program of `n` members and its states (one per
    lane, copies added as needed). Returns (seconds, programs with their states advanced)."""
    parts = [batches[lo:lo + size] for lo in range(0, batches.shape[0], size)]

    def chunks(states):
        states = {n: list(s) for n, s in states.items()}
        for first in range(0, len(parts), lanes):
            group = parts[first:first + lanes]
            outputs = population.concurrently([
                partial(programs[part.shape[0]][0], states[part.shape[0]][i],
                        programs[part.shape[0]][2], part, data) for i, part in enumerate(group)])
            for i, (part, (state, _)) in enumerate(zip(group, outputs)):
                states[part.shape[0]][i] = state
        return states

    start = {n: [*st, *(jax.tree.map(jnp.copy, st[0]) for _ in range(lanes - len(st)))]
             for n, (_, st, _) in programs.items()}
    seconds, states = time_calls(chunks, start, repeats, target_s)
    return seconds, {n: (c, states[n], hp) for n, (c, _, hp) in programs.items()}


def bench_network(network: str, batch_sizes, populations, data, device, peaks, baseline: int,
                  args, log) -> tuple[list, list]:
    """Measure every (batch size, population) of one network. Returns a dict per row, and one per
    configuration that failed (out of memory). `baseline` is the memory high-water mark before
    any training, subtracted from each row's."""
    rows, skipped = [], []
    fps = train_flops_per_sample(network)
    peak = peaks["matmul_flop_per_s"]
    timing = (2, 0.3) if args.quick else (3, 1.0)  # repeats, seconds per measurement
    for b in batch_sizes:
        static, hparams = bench_setup(network, b, args.dtype, args.lc_lowering, args.microbatch)
        n_params = count_params(jax.eval_shape(partial(train.init_params, static),
                                               jax.random.key(0), jnp.float32(1))[0])
        lowering = (lc_lowering_name(static.lc_lowering, device.platform) if network == "lc"
                    else None)
        bound = row_bound(network, b, n_params, peaks, device.platform, lowering)
        # One step count per batch size, so the P=1 program replays any member's batches.
        steps = (2 if args.quick and network == "lc"
                 else choose_steps(max(populations) * b * fps, peak, args.quick,
                                   data.x_train.shape[0] // b))
        # Programs by member count (the P=1 one also times members one after another), each
        # with its compile seconds and XLA memory.
        programs, built = {}, {}
        for p in sorted({1, *populations}):
            if args.max_gflop_per_step and p * b * fps > args.max_gflop_per_step * 1e9:
                skipped.append({"network": network, "batch_size": b, "population": p,
                                "error": f"over --max-gflop-per-step {args.max_gflop_per_step}"})
                break  # larger populations are over it too
            n_train, budget = data.x_train.shape[0], population.device_memory(device)
            size, lanes = population.plan_group(static, p, [device], n_train, budget)
            try:
                for n in sorted({1, *population.chunk_sizes(p, size, 1)} - set(programs)):
                    compiled, state, hp, compile_s, xla_bytes = build_population(
                        static, hparams, data, n, steps)
                    programs[n], built[n] = (compiled, [state], hp), (compile_s, xla_bytes)
                batches = member_batches(n_train, p, steps, b)
                seconds, programs = measure_chunks(programs, batches, data, size, lanes, *timing)
            except jax.errors.JaxRuntimeError as e:  # out of memory: record it, go on
                log(f"  {network} B={b} P={p}: failed: {str(e).splitlines()[0]}")
                skipped.append({"network": network, "batch_size": b, "population": p,
                                "error": str(e).splitlines()[0]})
                break  # larger populations would fail too
            if p not in populations:
                continue
            samples_s = p * steps * b / seconds
            compile_s, xla_bytes = built[size]
            row = {"network": network, "batch_size": b, "population": p, "chunk_members": size,
                   "chunk_lanes": lanes,
                   "microbatch": train.microbatch_size(static, device.platform), "steps": steps,
                   "n_params": n_params, "seconds_per_call": seconds,
                   "member_samples_per_s": samples_s, "member_steps_per_s": samples_s / b,
                   "flops_per_sample": fps, "flop_per_s": samples_s * fps,
                   "pct_matmul_peak": 100 * samples_s * fps / peak, "compile_s": compile_s,
                   "xla_memory_bytes": xla_bytes,
                   "high_water_growth_bytes": memory_high_water(device)[0] - baseline,
                   **({"lc_lowering": lowering} if lowering else {}), **bound,
                   "pct_bound": 100 * samples_s / bound["bound_member_samples_per_s"],
                   "pct_bw_bound": 100 * samples_s / b / bound["bw_bound_member_steps_per_s"]}
            if p > 1:
                seq_s, programs = measure_chunks(programs, batches, data, 1, 1, *timing)
                row["sequential_samples_per_s"] = p * steps * b / seq_s
                row["vmap_speedup"] = seq_s / seconds
            rows.append(row)
            log(f"  {network} B={b} P={p} ({size} per chunk, {lanes} at once): "
                f"{samples_s:,.0f} member-samples/s, "
                f"{row['pct_matmul_peak']:.1f}% of matmul peak, {row['pct_bound']:.0f}% of its "
                f"bound ({row['bound']}), compile {compile_s:.1f} s")
    return rows, skipped


def flop_floor(sweep_name: str, n_train: int, peak: float) -> dict:
    """Training FLOPs of the full-scale sweep (every member, every epoch, full batches only) and
    the seconds they need at `peak` FLOP/s: a floor no implementation on this device can beat."""
    members = expand(load_sweep(sweep_name))  # on_cpu=False: the full-scale grid
    flops = sum(m.static.epochs * (n_train // m.static.batch_size * m.static.batch_size)
                * train_flops_per_sample(m.network) for m in members)
    return {"sweep": sweep_name, "members": len(members), "train_flops": flops,
            "seconds_at_peak": flops / peak}


def pick(rows, **match) -> list:
    """The rows whose fields equal `match`."""
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def target_summary(rows: list) -> list[dict]:
    """The performance-target ratios, each {"text", "value", "target"} (target None: no target)."""
    out = []
    for net in ("cnn", "lc"):
        large = {r["batch_size"] for r in pick(rows, network=net) if r["batch_size"] >= 128}
        for b in sorted(large):
            best = max(pick(rows, network=net, batch_size=b), key=lambda r: r["pct_matmul_peak"])
            out.append({"text": f"{net} B={b}: {best['pct_matmul_peak']:.1f}% of matmul peak "
                        f"(best P={best['population']})", "value": best["pct_matmul_peak"],
                        "target": None})
    for r in pick(rows, network="lc", batch_size=16):
        out.append({"text": f"lc B=16 P={r['population']}: {r['pct_bw_bound']:.0f}% of the "
                    "weight-traffic bandwidth bound", "value": r["pct_bw_bound"], "target": None})
    fc16 = [r for r in pick(rows, network="fc", batch_size=16) if r["population"] > 1]
    if fc16:
        big = max(fc16, key=lambda r: r["population"])
        p = big["population"]
        out.append({"text": f"fc B=16 P={p}: {big['vmap_speedup']:.1f}x sequential "
                    "(target >= 4x at P=64)", "value": big["vmap_speedup"], "target": 4.0})
        ones = pick(rows, network="fc", population=1)
        if ones:
            ref = max(ones, key=lambda r: r["batch_size"])
            ratio = 100 * big["member_samples_per_s"] / ref["member_samples_per_s"]
            out.append({"text": f"fc B=16 P={p}: {ratio:.0f}% of one fc model's samples/s at "
                        f"B={ref['batch_size']} (target >= 50% vs B=1024, P=64)",
                        "value": ratio, "target": 50.0})
    return out


def markdown(result: dict) -> str:
    """The Markdown report: peaks, the table, target ratios and the FLOP floors."""
    pk = result["peaks"]
    quick = ", quick" if result["quick"] else ""
    lines = [f"# Benchmark: {result['device']} ({result['dtype']}{quick})",
             "", f"Device: {result['device_description']}.", "",
             f"Matmul peak {pk['matmul_flop_per_s'] / 1e9:,.0f} GFLOP/s ({pk['matmul_n']}^3 "
             f"{pk['matmul_dtype']}); memory bandwidth {pk['copy_bytes_per_s'] / 1e9:,.1f} GB/s "
             "(in-place x + 1, read + write). "
             f"Memory: XLA's size of each program; high-water growth = {result['memory_source']} "
             "beyond its value before training (it only grows, so a row shows the largest so far). "
             "Bound: the lower of the matmul peak over the training FLOPs (with the grouped patch "
             "FLOPs where `conv_general_dilated_local` runs on CPU) and the weight traffic "
             f"({result['weight_passes']} float32 passes per step) at the memory bandwidth.",
             *[f"LC layers ran as: {name}." for name in
               sorted({r["lc_lowering"] for r in result["rows"] if "lc_lowering" in r})],
             "A population of P trains in chunks of members, as `population.run_group` runs "
             "it (on a CPU, as many members as its cache holds, two chunks at once from two "
             "threads); speed-up: over the same P members trained one at a time.",
             "Block: the samples of a batch a step works through at a time, summing their "
             "gradients (`train.microbatch_size`).",
             "", "| net | B | P | per chunk | at once | block | steps | member-samples/s | GFLOP/s "
             "| % peak | bound | % bound | compile s | XLA MB | high-water growth MB | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    mb = lambda v: f"{v / 2**20:,.0f}" if v is not None else "-"
    for r in result["rows"]:
        speedup = f"{r['vmap_speedup']:.1f}x" if "vmap_speedup" in r else "-"
        lines.append(f"| {r['network']} | {r['batch_size']} | {r['population']} "
                     f"| {r['chunk_members']} | {r.get('chunk_lanes', 1)} | {r['microbatch']} "
                     f"| {r['steps']} "
                     f"| {r['member_samples_per_s']:,.0f} | {r['flop_per_s'] / 1e9:,.1f} "
                     f"| {r['pct_matmul_peak']:.1f} | {r['bound']} | {r['pct_bound']:.0f} "
                     f"| {r['compile_s']:.1f} "
                     f"| {mb(r['xla_memory_bytes'])} | {mb(r['high_water_growth_bytes'])} "
                     f"| {speedup} |")
    lines += [""] * bool(result["skipped"])
    lines += [f"- not run: {s['network']} B={s['batch_size']} P={s['population']} and larger P: "
              f"{s['error']}" for s in result["skipped"]]
    lines += ["", "Targets:", *[f"- {t['text']}" for t in result["targets"]], "",
              "FLOP floor of the full-scale Task 2 sweeps (training only, at the matmul peak):",
              *[f"- {f['sweep']}: {f['members']} members, {f['train_flops']:.3g} FLOP, "
                f">= {f['seconds_at_peak']:,.0f} s" for f in result["flop_floor"]]]
    return "\n".join(lines) + "\n"


def _int_list(flag: str, text: str | None) -> tuple | None:
    """Comma-separated positive integers, or None when the flag was not given."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise InputError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return values


def load_data(path: str | None, batch_sizes, flag: str) -> train.Data:
    """The USPS arrays (found as `uspsjax.sweep` finds them); InputError if a batch size asked
    for by `flag` exceeds the training set."""
    from uspsjax import data as data_mod
    data = train.as_data(data_mod.load(path))
    n_train = data.x_train.shape[0]
    if batch_sizes and max(batch_sizes) > n_train:
        raise InputError(f"{flag}: {max(batch_sizes)} exceeds the {n_train} training samples")
    return data


def build_parser() -> cli.Parser:
    """The command line of `python -m uspsjax.bench`."""
    p = cli.Parser(prog="python -m uspsjax.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small grid (< 2 minutes on 2 cores)")
    p.add_argument("--networks", type=cli.networks,
                   help=f"comma-separated networks (default: {','.join(NETWORKS)})")
    p.add_argument("--batch-sizes", help="comma-separated batch sizes (default: 16,128,1024)")
    p.add_argument("--populations", help="comma-separated member counts (default per network)")
    p.add_argument("--dtype", choices=train.DTYPES, default="float32",
                   help="compute dtype; parameters stay float32")
    p.add_argument("--max-gflop-per-step", type=float,
                   help="skip configurations whose training step exceeds this many GFLOP "
                        "(keeps a full run on a small CPU to minutes)")
    p.add_argument("--lc-lowering", choices=LC_LOWERINGS, default="auto",
                   help="how the LC layers run: auto (the C kernels on a CPU where they "
                        "build, conv_general_dilated_local elsewhere), reference "
                        "(conv_general_dilated_local everywhere), sliced (XLA's dots on "
                        "sliced patches everywhere) or kernels (the C kernels on a CPU, "
                        "sliced elsewhere); "
                        "each LC row records the one it ran")
    p.add_argument("--microbatch", type=int, default=0,
                   help="samples a training step works through at a time (default 0: as the "
                        "platform prefers, on a CPU the CNN in blocks of 32; a batch size: the "
                        "whole batch at once); each row records it")
    p.add_argument("--out", default="results/bench", help="output folder (default: results/bench)")
    p.add_argument("--data", help="the USPS h5 file (default: as `uspsjax.sweep`)")
    return p


@cli.command
def main(argv=None) -> int:
    """Entry point; returns the exit status (2 for bad input, with a one-line error)."""
    args = build_parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    nets = args.networks or tuple(NETWORKS)
    batch_sizes = _int_list("--batch-sizes", args.batch_sizes)
    populations = _int_list("--populations", args.populations)
    if args.max_gflop_per_step is not None and not args.max_gflop_per_step > 0:
        raise InputError(f"--max-gflop-per-step: expected a positive number, "
                         f"got {args.max_gflop_per_step}")
    if args.microbatch < 0:
        raise InputError(f"--microbatch: expected 0 or a positive integer, got {args.microbatch}")
    grid = QUICK_GRID if args.quick else FULL_GRID
    shapes = {net: grid.get(net, grid["fc"]) for net in nets}
    for net in nets:  # settings that cannot run fail here, before anything is measured
        for b in batch_sizes or shapes[net][0]:
            bench_setup(net, b, args.dtype, args.lc_lowering, args.microbatch)
    cli.check_out(Path(args.out))
    data = load_data(args.data, batch_sizes or (), "--batch-sizes")
    n_train = data.x_train.shape[0]
    t_start = time.perf_counter()
    device = jax.devices()[0]
    description, versions = environment()
    peaks = measure_peaks(device, args.dtype, 2 if args.quick else 5, 0.2 if args.quick else 0.5)
    log(f"bench on {description}: matmul {peaks['matmul_flop_per_s'] / 1e9:,.0f} GFLOP/s, "
        f"copy {peaks['copy_bytes_per_s'] / 1e9:,.1f} GB/s")
    baseline, memory_source = memory_high_water(device)
    rows, skipped = [], []
    for net in nets:
        done, failed = bench_network(net, batch_sizes or shapes[net][0],
                                     populations or shapes[net][1], data, device, peaks,
                                     baseline, args, log)
        rows, skipped = rows + done, skipped + failed
    result = {"device": device_slug(device), "device_description": description,
              "cpu": machine.cpu() if device.platform == "cpu" else None,
              "platform": device.platform, "dtype": args.dtype, "quick": args.quick,
              "versions": versions, "peaks": peaks, "memory_source": memory_source,
              "weight_passes": WEIGHT_PASSES, "rows": rows, "skipped": skipped,
              "targets": target_summary(rows),
              "flop_floor": [flop_floor(s, n_train, peaks["matmul_flop_per_s"])
                             for s in FLOOR_SWEEPS]}
    result["wall_time_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = result["device"] + ("" if args.dtype == "float32" else f"-{args.dtype}")
    report = markdown(result)
    cli.write_text(out / f"{stem}.json", json.dumps(result, indent=1))
    cli.write_text(out / f"{stem}.md", report)
    print(report)
    log(f"bench: {result['wall_time_s']:.0f} s; wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
