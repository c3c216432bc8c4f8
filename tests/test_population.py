"""Populations: checkpoint and resume after SIGKILL, Ctrl-C, sharding across devices, memory
chunks."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np

from conftest import assert_curves_match
from uspsjax import machine, population, results
from uspsjax.train import Static, make_hparams

# On the 1,024-image subset: 128 steps an epoch (0.6-0.8 s for the 6 members on a 2-core
# Xeon), so after the 2 epochs a test waits for, 10 are left (~7 s) to be interrupted in, while
# the test polls every 0.2 s.
SLOW = """
name = "slow"
networks = ["fc"]
seeds = 3
[base]
epochs = 12
batch_size = 8
lr = 0.01
momentum = 0.9
[axes]
lr = [0.01, 0.003]
"""


def sweep_cmd(path, out, ck, *extra):
    return [sys.executable, "-m", "uspsjax.sweep", str(path), "--out", str(out),
            "--checkpoints", str(ck), "--quiet", *extra]


def env(shared_h5, **extra):
    return {**os.environ, "USPSJAX_DATA": str(shared_h5), "PYTHONPATH": os.getcwd(), **extra}


def saved_epochs(chunk_dir) -> int:
    """The latest epoch checkpointed in a chunk's folder (orbax names each by its epoch, after
    a complete save), 0 when none."""
    steps = [int(p.name) for p in chunk_dir.glob("*") if p.name.isdigit()] if chunk_dir.is_dir() else []
    return max(steps, default=0)


def wait_for_epoch(ck_dir, proc, epochs=1, timeout=240):
    """Wait until the checkpoint holds at least `epochs` completed epochs of group 0."""
    start = time.time()
    while time.time() - start < timeout:
        if saved_epochs(ck_dir / "group0" / "chunk0") >= epochs:
            return
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, subset_h5):
    path = tmp_path / "slow.toml"
    path.write_text(SLOW)
    e = env(subset_h5)
    whole = subprocess.run(sweep_cmd(path, tmp_path / "whole", tmp_path / "ck1"), env=e,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(sweep_cmd(path, tmp_path / "cut", tmp_path / "ck2"), env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_epoch(tmp_path / "ck2" / "slow", proc, epochs=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "slow").exists()
    resumed = subprocess.run(sweep_cmd(path, tmp_path / "cut", tmp_path / "ck2", "--resume"),
                             env=e, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = results.read_metrics(tmp_path / "whole" / "slow" / "metrics.h5")
    b = results.read_metrics(tmp_path / "cut" / "slow" / "metrics.h5")
    np.testing.assert_array_equal(a.curves, b.curves)
    np.testing.assert_array_equal(a.test_probs, b.test_probs)
    # A finished run leaves no checkpoint; resuming it again is an error, not a re-run.
    again = subprocess.run(sweep_cmd(path, tmp_path / "cut", tmp_path / "ck2", "--resume"),
                           env=e, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "nothing to resume" in again.stderr


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(tmp_path, subset_h5):
    path = tmp_path / "slow.toml"
    path.write_text(SLOW)
    # A shell that runs the suite in the background ignores SIGINT, and children inherit that:
    # the sweep gets Python's own handler back, as under a terminal, before it starts.
    interruptible = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
                     " runpy.run_module('uspsjax.sweep', run_name='__main__', alter_sys=True)")
    cmd = [sys.executable, "-c", interruptible,
           *sweep_cmd(path, tmp_path / "out", tmp_path / "ck")[3:]]
    proc = subprocess.Popen(cmd, env=env(subset_h5), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_epoch(tmp_path / "ck" / "slow", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    assert saved_epochs(tmp_path / "ck" / "slow" / "group0" / "chunk0") >= 1
    assert not (tmp_path / "out" / "slow").exists()


SHARDED = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    from uspsjax import population, train
    from uspsjax.data import load
    n_dev = int(sys.argv[1])
    ds = load()
    data = train.Data(*(jnp.asarray(a) for a in (ds.x_train[:256], ds.y_train[:256],
                                                 ds.x_test[:128], ds.y_test[:128])))
    static = train.Static(network="fc", epochs=2, batch_size=32)
    keys = jnp.stack([population.member_key(s) for s in range(6)])
    hps = population.stack([train.make_hparams(lr=0.01 * (1 + i)) for i in range(6)])
    devices = jax.devices()[:n_dev]
    layouts = []
    res = population.run_group(static, keys, hps, data, devices=devices,
                               on_epoch=lambda info: layouts.append(info["members_per_device"]))
    print("DEVICES", len(jax.devices()), "LAYOUT", layouts[-1])
    np.save(sys.argv[2], res.curves)
""")


def test_sharded_population_equals_one_device(tmp_path, shared_h5):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    e = env(shared_h5, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    outputs = {}
    for n in (1, 4):
        proc = subprocess.run([sys.executable, str(script), str(n), str(tmp_path / f"c{n}.npy")],
                              env=e, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outputs[n] = proc.stdout
    # 6 members padded to 8, two on each of the 4 devices; on one device all 6 together.
    assert "DEVICES 4 LAYOUT [2, 2, 2, 2]" in outputs[4]
    assert "DEVICES 4 LAYOUT [6]" in outputs[1]
    assert_curves_match(np.load(tmp_path / "c1.npy"), np.load(tmp_path / "c4.npy"), 128)


def test_population_runs_in_chunks_when_memory_is_short(small, monkeypatch):
    monkeypatch.setattr(population, "cpu_lane_limit", lambda: 2)  # as on any 2-core CPU
    static = Static(network="fc", epochs=2, batch_size=32)
    keys = jnp.stack([population.member_key(s) for s in range(5)])
    hps = population.stack([make_hparams(lr=0.01 * (1 + i)) for i in range(5)])
    whole = population.run_group(static, keys, hps, small)
    member = population.bytes_per_member(static, small.x_train.shape[0])
    # Two chunks at once share the budget: 2 + 2 + 1 members, two at a time.
    chunked = population.run_group(static, keys, hps, small, memory_budget=4 * member)
    # Room for one member only: one chunk at a time.
    alone = population.run_group(static, keys, hps, small, memory_budget=member)
    assert (whole.chunks, whole.lanes) == (1, 1)
    assert (chunked.chunks, chunked.chunk_members, chunked.lanes) == (3, 2, 2)
    assert (alone.chunks, alone.lanes) == (5, 1)
    for run in (chunked, alone):
        assert_curves_match(whole.curves, run.curves, small.x_test.shape[0])
        np.testing.assert_array_equal(whole.diverged, run.diverged)
        np.testing.assert_allclose(whole.test_probs, run.test_probs, rtol=0, atol=1e-4)


def test_chunks_trained_at_once_equal_one_after_another_bit_for_bit(small, monkeypatch):
    # The same chunks (2 + 2 + 1 members), two at a time from two threads or one at a time:
    # the same programs on the same machine, so the same bits.
    monkeypatch.setattr(population, "cpu_cache_bytes", lambda: 2**40)
    static = Static(network="fc", epochs=2, batch_size=16)
    keys = jnp.stack([population.member_key(s) for s in range(5)])
    hps = population.stack([make_hparams(lr=0.01 * (1 + i)) for i in range(5)])
    member = population.bytes_per_member(static, small.x_train.shape[0])
    runs = {}
    for lanes in (2, 1):
        monkeypatch.setattr(population, "cpu_lane_limit", lambda n=lanes: n)
        runs[lanes] = population.run_group(static, keys, hps, small,
                                           memory_budget=2 * lanes * member)
        assert (runs[lanes].chunks, runs[lanes].chunk_members, runs[lanes].lanes) == (3, 2, lanes)
    for field in ("curves", "diverged", "test_probs"):
        np.testing.assert_array_equal(getattr(runs[2], field), getattr(runs[1], field))


def test_memory_estimate_chunks_a_large_lc_population():
    lc = population.bytes_per_member(Static(network="lc", batch_size=16), 7291)
    assert lc > 4 * 4 * 33_177_770  # parameters, momentum, gradients, update
    # 64 LC members do not fit 16 GB: they run in chunks; 8 devices keep chunks a multiple of 8.
    assert population.chunk_size(64, 1, lc, 16 * 2**30) < 64
    assert population.chunk_size(64, 8, lc, 2 * 2**30) % 8 == 0


def test_chunks_are_even_and_within_their_limits():
    # 8 members at most 3 at a time: 3 + 3 + 2, not 3 + 3 + 3 with a padded member.
    assert population.chunk_size(8, 1, 1, 2**40, most=3) == 3
    assert population.chunk_sizes(8, 3, 1) == [3, 3, 2]
    # Memory alone: 9 members, 8 fit: two chunks of 5 (one padded), not 8 + 8.
    assert population.chunk_size(9, 1, 100, 800) == 5
    assert population.chunk_sizes(9, 5, 1) == [5, 4]
    # Two devices: chunks stay multiples of the device count; the last padded to one.
    assert population.chunk_size(7, 2, 1, 2**40, most=2) == 4
    assert population.chunk_sizes(7, 4, 2) == [4, 4]
    assert population.chunk_size(5, 1, 1, 2**40) == 5  # no limit: one chunk
    # Two lanes: as many chunks as fill both in every round, where there are members enough.
    assert population.chunk_size(8, 1, 1, 2**40, most=3, lanes=2) == 2  # 2 + 2 + 2 + 2
    assert population.chunk_size(64, 1, 1, 2**40, most=24, lanes=2) == 16  # not 22 + 22 + 20
    assert population.chunk_size(64, 1, 1, 2**40, most=12, lanes=2) == 11  # 5 x 11 + 9
    assert population.chunk_size(5, 1, 1, 2**40, lanes=2) == 5  # one chunk stays one
    assert population.chunk_size(3, 1, 1, 2**40, most=2, lanes=2) == 2  # 2 + 1
    assert population.chunk_size(1, 1, 1, 2**40, lanes=2) == 1


def test_cpu_chunks_keep_a_step_within_the_cache(monkeypatch):
    monkeypatch.setattr(population, "cpu_cache_bytes", lambda: 16 * 2**20)
    widths = {}
    for net in ("fc", "cnn", "lc"):
        for b in (16, 32, 128):
            static = Static(network=net, batch_size=b)
            widths[net, b] = population.cpu_members_per_chunk(static)
            n_params, per_sample = population.member_sizes(static)
            step_bytes = 4 * (3 * n_params + b * per_sample)
            assert widths[net, b] * step_bytes <= 16 * 2**20 or widths[net, b] == 1
            assert (widths[net, b] + 1) * step_bytes > 16 * 2**20
    assert population.member_sizes(Static(network="cnn"))[0] == 315_146
    assert widths["lc", 16] == 1  # 133 MB of parameters: one member at a time
    assert widths["fc", 16] > widths["cnn", 16] > widths["cnn", 128] == 1


def test_the_cache_budget_is_half_the_last_level_cache_at_most_16_mib_unless_measured(
        tmp_path):
    for index, (level, kind, size) in enumerate((("1", "Data", "48K"), ("1", "Instruction",
                                                                         "32K"),
                                                 ("2", "Unified", "2048K"),
                                                 ("3", "Unified", "107520K"))):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(value + "\n")
    assert machine.cache_bytes("L3", tmp_path) == 107520 * 2**10
    assert machine.cache_bytes("L2", tmp_path) == 2 * 2**20
    assert machine.cache_bytes("L4", tmp_path) is None
    for family_model, last_level, budget in (("6/167", 105 * 2**20, 16 * 2**20),
                                             ("25/1", 8 * 2**20, 4 * 2**20),
                                             ("25/1", 2**20, 2**19), ("?/?", None, 16 * 2**20),
                                             # a machine measured: its own budget
                                             ("6/167", 480 * 2**20, 32 * 2**20)):
        assert population.cache_budget(family_model, last_level) == budget, family_model


def test_the_cpu_record_names_the_isa_limits_set_for_xla(monkeypatch):
    assert machine.xla_flag("", "--xla_cpu_max_isa") is None
    assert machine.xla_flag("--xla_cpu_max_isa=AVX2 --xla_force_host_platform_device_count=2",
                            "--xla_cpu_max_isa") == "AVX2"
    assert machine.xla_flag("--xla_cpu_max_isa=SSE4_2 --xla_cpu_max_isa=AVX",
                            "--xla_cpu_max_isa") == "AVX"
    onednn = "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    assert machine.isa_limits({"XLA_FLAGS": onednn}) == []  # oneDNN at its own widest ISA
    assert machine.isa_limits({"XLA_FLAGS": "", "ONEDNN_MAX_CPU_ISA": "AVX2"}) == []
    assert machine.isa_limits({"XLA_FLAGS": f"--xla_cpu_max_isa=AVX2 {onednn}",
                               "ONEDNN_MAX_CPU_ISA": "AVX2"}) == [
        "XLA's generated code limited to AVX2", "XLA's dots in oneDNN limited to AVX2"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    limited = machine.cpu()
    assert limited["isa"].endswith(", XLA's generated code limited to AVX2")
    assert "generated code limited to AVX2" in machine.describe(limited)
    monkeypatch.delenv("XLA_FLAGS")
    assert "limited" not in machine.cpu()["isa"]


def test_cpu_population_in_cache_sized_chunks_equals_one_chunk(small, monkeypatch):
    # Two chunks at once share 32 MiB of cache: 16 MiB each, 3 CNN members at batch 16.
    monkeypatch.setattr(population, "cpu_cache_bytes", lambda: 32 * 2**20)
    monkeypatch.setattr(population, "cpu_lane_limit", lambda: 2)
    static = Static(network="cnn", epochs=1, batch_size=16)
    assert population.cpu_members_per_chunk(static, lanes=2) == 3  # so 5 members run as 3 + 2
    keys = jnp.stack([population.member_key(s) for s in range(5)])
    # Small steps: a chaotic run would grow the chunks' rounding differences past the tolerance.
    hps = population.stack([make_hparams(lr=0.002 * (1 + i)) for i in range(5)])
    chunked = population.run_group(static, keys, hps, small)
    assert (chunked.chunks, chunked.chunk_members, chunked.lanes) == (2, 3, 2)
    monkeypatch.setattr(population, "cpu_cache_bytes", lambda: 2**40)
    whole = population.run_group(static, keys, hps, small)
    assert (whole.chunks, whole.chunk_members, whole.lanes) == (1, 5, 1)
    assert_curves_match(whole.curves, chunked.curves, small.x_test.shape[0])
    np.testing.assert_allclose(whole.test_probs, chunked.test_probs, rtol=0, atol=1e-4)


def test_progress_is_reported_from_inside_epochs(small):
    static = Static(network="fc", epochs=2, batch_size=16)  # 32 steps an epoch
    keys = jnp.stack([population.member_key(s) for s in range(2)])
    hps = population.stack([make_hparams(lr=0.01)] * 2)
    ticks, epochs = [], []
    quiet = population.run_group(static, keys, hps, small)
    res = population.run_group(static, keys, hps, small, on_step=ticks.append,
                               on_epoch=epochs.append)
    first = [t["step"] for t in ticks if t["epoch"] == 1]
    assert first == list(range(2, 33, 2))  # a sixteenth of the epoch apart, each step once
    assert all(t["steps"] == 32 and t["members"] == 2 and t["seconds"] > 0 for t in ticks)
    assert [e["epoch"] for e in epochs] == [1, 2]
    # Callbacks only report: training with and without them agrees (another program, so to
    # float32 rounding).
    assert_curves_match(quiet.curves, res.curves, small.x_test.shape[0])


def test_sweep_prints_progress_inside_long_epochs(small, monkeypatch):
    from uspsjax import sweep as sweep_mod
    monkeypatch.setattr(sweep_mod, "LIVE_SECONDS", 0.0)  # every callback counts as a long wait
    sweep = sweep_mod.load_sweep("baseline")
    lines = []
    plan = sweep_mod.plan_members(sweep, {"networks": ["fc"], "epochs": 1, "seeds": 1})
    sweep_mod.run_sweep(plan, small, log=lines.append)
    inside = [line for line in lines if " step " in line]
    assert inside and all("samples/s" in line and "s left" in line for line in inside)
    assert any("step 8/16" in line for line in inside)  # batch 32: 16 steps
