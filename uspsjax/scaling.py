"""How far the study scales, on paper: members per device from the engine's memory estimate,
and the wall time of full-scale sweeps on 1, 8 or 64 devices from a bench's measured
per-device rates (`python -m uspsjax.bench` writes them to results/bench/DEVICE.json).

    python -m uspsjax.scaling results/bench/cpu.json results/bench/nvidia-h100-80gb-hbm3.json

The model is the engine's own schedule with placement "members": static groups one after
another, each group's members spread evenly over the devices and run in chunks that fit
the memory budget; a device training m members at once reaches the bench's rate for the
largest population it measured that is not above m (at the nearest batch size it measured),
divided by the extra passes of adversarial training. Compilation, evaluation and checkpoint
writes are left out: an estimate of training time, not a promise.
"""

import json
import math
import sys
from pathlib import Path

from uspsjax import cli, population
from uspsjax.data import N_TRAIN
from uspsjax.errors import InputError
from uspsjax.grid import STUDY_ORDER, expand, group_members, load_sweep

DEVICE_COUNTS = (1, 8, 64)
GPU_BYTES = 80 * 10**9  # an 80 GB accelerator
CPU_BYTES = 24 * 2**30  # this machine's RAM


def budget(platform: str) -> int:
    """The bytes per device the engine lets a population use (`population.memory_budget_of`)."""
    return population.memory_budget_of(CPU_BYTES if platform == "cpu" else GPU_BYTES, platform)


def member_rate(rows: list[dict], network: str, batch_size: int, members: int) -> float:
    """Member-samples per second of one device training `members` members of `network`: the
    measured row at the nearest batch size (in ratio) and the largest population <= members
    (the smallest measured, when `members` is below it)."""
    mine = [r for r in rows if r["network"] == network]
    if not mine:
        raise InputError(f"the bench measured no {network} row")
    batch = min({r["batch_size"] for r in mine}, key=lambda b: abs(math.log(b / batch_size)))
    at_batch = sorted((r for r in mine if r["batch_size"] == batch),
                      key=lambda r: r["population"])
    fitting = [r for r in at_batch if r["population"] <= members] or at_batch[:1]
    return fitting[-1]["member_samples_per_s"]


def members_per_device(static, platform: str) -> int:
    """How many members of a static group fit one device's budget (at least one)."""
    return max(1, budget(platform) // population.bytes_per_member(static, N_TRAIN))


def step_factor(static) -> int:
    """Training passes per step relative to plain training: adversarial training first runs
    the attack, one forward and backward per FGSM or PGD step."""
    return 1 + {"none": 0, "fgsm": 1, "pgd": static.adv_steps}[static.adversarial]


def sweep_seconds(name: str, rows: list[dict], platform: str, devices: int) -> float:
    """Training seconds of the full-scale sweep `name` on `devices` devices of the bench's kind."""
    total = 0.0
    for static, idx in group_members(expand(load_sweep(name))).items():
        per_device = math.ceil(len(idx) / devices)
        chunks = math.ceil(per_device / members_per_device(static, platform))
        at_once = math.ceil(per_device / chunks)
        samples = static.epochs * (N_TRAIN // static.batch_size) * static.batch_size
        rate = member_rate(rows, static.network, static.batch_size, at_once)
        total += chunks * samples * at_once * step_factor(static) / rate
    return total


def duration(seconds: float) -> str:
    """Seconds as "42 s", "17 min" or "3.2 h"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def report(bench: dict) -> str:
    """The markdown section for one bench result: members per device, then sweep times."""
    rows, platform = bench["rows"], bench["platform"]
    memory = "80 GB" if platform != "cpu" else f"{CPU_BYTES / 2**30:.0f} GB of RAM"
    lines = [f"### {bench['device']} ({memory}; rates measured {bench['dtype']}"
             f"{', quick' if bench.get('quick') else ''})", "",
             "| network | batch | members per device | measured member-samples/s (P) |",
             "|---|---:|---:|---|"]
    seen = set()
    for name in STUDY_ORDER:
        for static in group_members(expand(load_sweep(name))):
            key = (static.network, static.batch_size)
            if key in seen:
                continue
            seen.add(key)
            fit = members_per_device(static, platform)
            measured = ", ".join(f"{r['member_samples_per_s']:,.0f} ({r['population']})"
                                 for r in rows if (r["network"], r["batch_size"]) == key)
            lines.append(f"| {key[0]} | {key[1]} | {fit:,} | {measured or 'not measured'} |")
    lines += ["", "| sweep (full scale) | " + " | ".join(f"{d} device{'s' * (d > 1)}"
                                                         for d in DEVICE_COUNTS) + " |",
              "|---|" + "---:|" * len(DEVICE_COUNTS)]
    totals = [0.0] * len(DEVICE_COUNTS)
    for name in STUDY_ORDER:
        secs = [sweep_seconds(name, rows, platform, d) for d in DEVICE_COUNTS]
        totals = [t + s for t, s in zip(totals, secs)]
        lines.append(f"| {name} | " + " | ".join(duration(s) for s in secs) + " |")
    lines.append("| **all** | " + " | ".join(f"**{duration(s)}**" for s in totals) + " |")
    return "\n".join(lines)


def build_parser() -> cli.Parser:
    """The command line of `python -m uspsjax.scaling`."""
    p = cli.Parser(prog="python -m uspsjax.scaling",
                   description="Estimate, from bench results, how many members fit a device and "
                               "how long the full-scale study sweeps train on 1, 8 and 64 "
                               "devices.")
    p.add_argument("bench", nargs="+", help="bench results (results/bench/DEVICE.json)")
    return p


@cli.command
def main(argv=None) -> int:
    """Entry point: print the estimate for each bench file as markdown."""
    args = build_parser().parse_args(argv)
    benches = []
    for path in map(Path, args.bench):
        try:
            benches.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read a bench result ({e})") from None
        if not isinstance(benches[-1], dict) or "rows" not in benches[-1]:
            raise InputError(f"{path}: not a bench result (no rows)")
    print("\n\n".join(report(b) for b in benches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
