#!/usr/bin/env python3
"""The side-by-side of `../shared/anchors/side_by_side.py` with both sides limited to AVX2 on an
AVX-512 machine: a stand-in for the AVX2 machine type where none is at hand, never a
measurement of it (results/bench/NOTES.md §32 says what it leaves out).

    .venv/bin/python scripts/side_by_side_avx2.py --out DIR   # ~7 min on 2 cores

PyTorch: ATen's kernels (`ATEN_CPU_CAPABILITY=avx2`), oneDNN and MKL limited to AVX2.
uspsjax: XLA's generated code (`--xla_cpu_max_isa=AVX2`), its dots given to oneDNN and limited
there (YNNPACK, which picks its kernels from the CPU alone, turned off), and the C kernels
built without AVX-512 (`CC="cc -mno-avx512f"`: 8-float vectors). The anchor runs as
side_by_side.py runs it; the bench runs only the anchor's rows, each network's single members
and its population in separate calls: XLA's oneDNN dot fusion hangs or crashes on some programs
(the FC's 64 members at batch 1024, no row of the anchor's; the LC at batch 1024, which it
corrupts the heap of in most runs, with or without the C kernels; the CNN's 8 members at batch 16
in some runs, which are run again). The LC runs without it: its products are the C kernels', and
its one dot, the 10-way output layer, runs in Eigen at the CPU's width.
"""
import argparse
import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANCHORS = ROOT.parent / "shared" / "anchors"
LIMITS = {
    "XLA_FLAGS": "--xla_cpu_max_isa=AVX2 --xla_cpu_use_onednn=true "
                 "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT "
                 "--xla_cpu_experimental_ynn_fusion_type=",
    "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "CC": f"{os.environ.get('CC', 'cc')} -mno-avx512f"}
LC_XLA_FLAGS = "--xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type="
# Runs of a bench call that dies of a signal: the oneDNN fusion corrupts the heap in some runs of
# programs it otherwise runs (the CNN's 8 members at batch 16 in 2 of 8, with or without the C
# kernels' changes of NOTES §37); each rerun is named in the output.
ATTEMPTS = 3
# (network, batch sizes, populations, XLA_FLAGS) per bench call: the anchor's rows, no others.
CALLS = [("fc", "16,1024", "1", LIMITS["XLA_FLAGS"]), ("fc", "16", "64", LIMITS["XLA_FLAGS"]),
         ("cnn", "16,1024", "1", LIMITS["XLA_FLAGS"]), ("cnn", "16", "8", LIMITS["XLA_FLAGS"]),
         ("lc", "16,32,1024", "1", LC_XLA_FLAGS)]
# The anchor's own command, as side_by_side.py gives it (its full, not its quick, steps).
ANCHOR_ARGS = ["--bench", "peak,train,ensemble", "--nets", "FC,CNN,LC", "--batch-sizes",
               "16,32,1024", "--pops", "FC:64,CNN:8", "--repeats", "1", "--epochs", "2",
               "--lc-max-steps", "16:120,32:80,1024:4", "--pop-max-steps", "FC:456,CNN:120"]


def main() -> int:
    """Run the anchor and the bench under the limits into --out and print the ratios' table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the raw outputs")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("side_by_side", ANCHORS / "side_by_side.py")
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **LIMITS}
    env.setdefault("USPSJAX_DATA", str(ROOT.parent / "shared" / "data" / "usps.h5"))
    t0 = time.time()
    with open(out / "torch.txt", "w") as log:
        subprocess.run([anchor.torch_python(), str(ANCHORS / "torch_ref" / "bench.py"),
                        *ANCHOR_ARGS, "--out", str(out / "torch.jsonl")],
                       env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    ours, crashes = {}, []
    for net, batches, pops, xla_flags in CALLS:
        folder = out / f"uspsjax-{net}-p{pops}"
        command = [sys.executable, "-m", "uspsjax.bench", "--networks", net, "--batch-sizes",
                   batches, "--populations", pops, "--out", str(folder)]
        for attempt in range(1, ATTEMPTS + 1):
            with open(folder.with_suffix(".txt"), "w") as log:
                run = subprocess.run(command, env={**env, "XLA_FLAGS": xla_flags}, stdout=log,
                                     stderr=subprocess.STDOUT)
            if run.returncode >= 0 or attempt == ATTEMPTS:
                run.check_returncode()
                break
            crashes.append(f"{net} P={pops} ({signal.Signals(-run.returncode).name})")
        for f in glob.glob(str(folder / "*.json")):
            for r in json.load(open(f))["rows"]:
                ours[(r["network"], r["batch_size"], r["population"])] = r["member_samples_per_s"]
    theirs = {}
    for line in open(out / "torch.jsonl"):
        d = json.loads(line)
        if d.get("bench") == "train":
            theirs[(d["net"].lower(), d["batch"], 1)] = d["samples_per_s"]
        elif d.get("bench") == "ensemble":
            theirs[(d["net"].lower(), d["batch"], d["P"])] = d["vmap_samples_per_s"]
    print(f"\nmember-samples/s on this machine ({anchor.cpu_line()}), both sides limited to "
          f"AVX2 ({' '.join(f'{k}={v!r}' for k, v in LIMITS.items())}; the LC's XLA_FLAGS "
          f"{LC_XLA_FLAGS!r}), one run "
          f"({time.time() - t0:.0f} s); raw outputs in {out}; bench calls run again after "
          f"XLA's oneDNN fusion crashed them: {', '.join(crashes) or 'none'}")
    print("| network | batch | members | PyTorch | uspsjax | uspsjax / PyTorch |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in anchor.CASES:
        a, b = theirs.get(key), ours.get(key)
        ratio = f"{b / a:.2f}" if a and b else "-"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {a or 0:,.0f} | {b or 0:,.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
