"""One sweep over several processes (`--distributed`): 2 processes x 2 CPU devices over
loopback, as a user launches them in two shells (or Slurm, or a launcher setting JAX's
variables), against 1 device; a killed process and a resume; only process 0 writes; clear
refusals."""

import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_curves_match
from test_faults import damage
from test_population import env as population_env, saved_epochs
from uspsjax import data, distributed, grid, population, results, sweep
from uspsjax.errors import InputError

# Batch 8: epochs long enough to kill a process between two (~1-2 s on the full training set,
# a few tenths of a second on the 1,024-image subset, where a test runs more of them).
SWEEP = """
name = "spread"
networks = ["fc"]
seeds = 3
[base]
epochs = 3
batch_size = 8
momentum = 0.9
[axes]
lr = [0.003, 0.001]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def env(data, devices: int) -> dict:
    """A sweep's environment with `devices` CPU devices per process."""
    return population_env(data, JAX_PLATFORMS="cpu",
                          XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def sweep_cmd(path, out, ck, *extra):
    return [sys.executable, "-m", "uspsjax.sweep", str(path), "--out", str(out),
            "--checkpoints", str(ck), *map(str, extra)]


def start(data, path, out, ck, port, n, i, *extra, devices=2):
    """Process `i` of `n`, joined through a coordinator on loopback `port`, as a shell runs it."""
    return subprocess.Popen(
        sweep_cmd(path, out, ck, "--distributed", "--coordinator", f"127.0.0.1:{port}",
                  "--num-processes", n, "--process-id", i, "--init-timeout", 60, *extra),
        env=env(data, devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def launch(data, path, outs, ck, *extra):
    """One process per folder in `outs` (process i writes to outs[i], if at all)."""
    port = free_port()
    return [start(data, path, out, ck, port, len(outs), i, *extra)
            for i, out in enumerate(outs)]


def finish(procs, timeout=600):
    """(status, stdout, stderr) of each process, once it ends."""
    outcome = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        outcome.append((p.returncode, out, err))
    return outcome


def own(text: str) -> list[str]:
    """The lines of a process's output that are not gloo's own ("[Gloo] Rank 0 is connected
    to 3 peer ranks...", printed on stdout as each communicator forms)."""
    return [line for line in text.splitlines() if not line.startswith("[Gloo]")]


def sweep_file(folder, epochs: int = 3):
    path = folder / "spread.toml"
    path.write_text(SWEEP.replace("epochs = 3", f"epochs = {epochs}"))
    return path


def wait_for_checkpoint(chunk, procs, epochs: int = 1) -> None:
    """Wait until `epochs` epochs of the chunk folder `chunk` are checkpointed, the processes
    alive."""
    start_s = time.time()
    while saved_epochs(chunk) < epochs:
        assert all(p.poll() is None for p in procs), "the sweep ended before it was killed"
        assert time.time() - start_s < 300, "no checkpoint appeared"
        time.sleep(0.05)


def damage_newest(chunk) -> int:
    """The newest epoch kept in `chunk`, damaged: a bit flipped in it, unless the kill cut its
    save short (no manifest yet, which a resume treats as damaged too). A resume must skip it
    for the one before, which is always whole."""
    kept = sorted(int(p.name) for p in chunk.iterdir() if p.name.isdigit())
    assert len(kept) >= 2, kept  # (three when the kill came before the oldest was dropped)
    if (chunk / str(kept[-1]) / population.MANIFEST).exists():
        damage(chunk / str(kept[-1]), "flipped")
    return kept[-1]


def read(folder):
    return results.read_metrics(folder / "spread" / "metrics.h5")


# Compared across device layouts: batches of 16 to 64 on the 1,024-image subset (at most 128
# steps) stay within float32 rounding (~1e-7); at batch 8 (384 steps) one member in six once
# grew it to 1e-3 (SGD amplifies rounding like any perturbation; on one process too).
GROUPS = """
name = "spread"
networks = ["fc"]
seeds = 2
[base]
epochs = 2
batch_size = 16
lr = 0.003
momentum = 0.9
[axes]
batch_size = [16, 32, 64]
"""


def test_two_processes_equal_one_device_whichever_the_placement(tmp_path, subset_h5):
    # One process of four devices against one device: test_population's sharded test.
    path = tmp_path / "spread.toml"
    path.write_text(GROUPS)
    one = subprocess.run(sweep_cmd(path, tmp_path / "one", tmp_path / "ck1", "--devices", 1,
                                   "--quiet"),
                         env=env(subset_h5, 1), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    ref, said = read(tmp_path / "one"), {}
    for placement in ("members", "groups"):
        tmp = tmp_path / placement
        outcome = finish(launch(subset_h5, path, [tmp / "out0", tmp / "out1"], tmp / "ck",
                                "--placement", placement))
        (code0, out0, said[placement]), (code1, out1, err1) = outcome
        assert code0 == 0 and code1 == 0, said[placement] + err1
        # Only process 0 writes and speaks: process 1's folder never appears, it prints nothing
        # of its own (the runtime's gloo lines aside; where it trains whole groups, orbax's
        # warnings as it checkpoints them), and the checkpoints are gone after the run.
        assert (tmp / "out0" / "spread" / "metrics.h5").is_file()
        assert not (tmp / "out1").exists() and not (tmp / "ck").exists()
        assert "spread" in out0 and own(out1) == []
        assert placement == "groups" or own(err1) == []
        two = read(tmp / "out0")
        assert two.device.endswith("4 devices in 2 processes")
        assert two.settings == ref.settings
        assert_curves_match(two.curves, ref.curves, n_test=256)
        np.testing.assert_array_equal(two.diverged, ref.diverged)
        # metrics.h5 stores the softmax outputs as float16: a rounding may cross one of its
        # steps.
        np.testing.assert_allclose(two.test_probs, ref.test_probs, atol=1e-3)
    assert "members sharded over 4 devices" in said["members"]
    assert "epoch 1/2" in said["members"]
    # Equal FLOPs: the groups go in order to the least loaded process, so batch 32 trains on
    # process 1, and process 0 reports it after the gather.
    err0 = said["groups"]
    assert "whole groups placed on 2 processes, members sharded over each one's 2 devices" in err0
    assert "[2/3] fc batch_size=32 epochs=2: 2 members done in" in err0
    assert err0.count("on process 1") == 1


def slurm_env(data, task: int, job: int) -> dict:
    """What `srun --ntasks 2 python -m uspsjax.sweep NAME --distributed` gives task `task` of
    job `job`, the one node being this machine: JAX's Slurm detection takes the coordinator
    from the node list and a port from the job id."""
    return {**env(data, 2), "SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": "2", "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
            "SLURM_STEP_NUM_NODES": "1"}


def test_a_killed_process_then_both_resumed_equal_the_uninterrupted_run(tmp_path, subset_h5):
    # The three ways processes find each other: the uninterrupted run launched as Slurm
    # launches it, the interrupted one by flags, its resume by JAX's variables. The newest
    # epoch of the chunk, whose members span both processes, is damaged before the resume.
    # 8 epochs of 128 steps on the subset: 5 left to be killed in once 3 are saved.
    path = sweep_file(tmp_path, epochs=8)
    job = next(j for j in random.sample(range(2**12), 64) if port_is_free(61440 + j))
    whole = finish([subprocess.Popen(
        sweep_cmd(path, tmp_path / f"whole{i}", tmp_path / "ck_whole", "--distributed"),
        env=slurm_env(subset_h5, i, job), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)])
    assert [r[0] for r in whole] == [0, 0], whole[0][2] + whole[1][2]
    assert read(tmp_path / "whole0").device.endswith("4 devices in 2 processes")
    assert not (tmp_path / "whole1").exists()
    ck = tmp_path / "ck"
    outs = [tmp_path / "out0", tmp_path / "out1"]
    procs = launch(subset_h5, path, outs, ck)
    chunk = ck / "spread" / "group0" / "chunk0"
    wait_for_checkpoint(chunk, procs, epochs=3)
    procs[1].send_signal(signal.SIGKILL)
    # The survivor stops by itself once the runtime misses process 1's heartbeats
    # (--heartbeat-timeout); a scheduler ends the whole job at once, as here.
    procs[0].send_signal(signal.SIGKILL)
    finish(procs)
    assert not (outs[0] / "spread").exists()
    damaged = damage_newest(chunk)
    # Resumed as a launcher that sets JAX's variables instead of flags would.
    port = free_port()
    resumed = finish([subprocess.Popen(
        sweep_cmd(path, out, ck, "--distributed", "--resume"),
        env={**env(subset_h5, 2), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
             "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, out in enumerate(outs)])
    assert [r[0] for r in resumed] == [0, 0], resumed[0][2] + resumed[1][2]
    assert "epoch 1/8" not in resumed[0][2]  # it went on from the checkpoint
    said = resumed[0][2]
    assert f"the checkpoint of epoch {damaged} is damaged" in said and "Traceback" not in said
    assert own(resumed[1][1]) == [] and "Traceback" not in resumed[1][2]
    # The same program on the same machine, resumed from a checkpoint: bit for bit.
    a, b = read(tmp_path / "whole0"), read(outs[0])
    np.testing.assert_array_equal(a.curves, b.curves)
    np.testing.assert_array_equal(a.test_probs, b.test_probs)


def killed_in_groups(data, path, outs, ck):
    """Two processes with whole groups placed on them, both killed once process 1's group has
    checkpointed 3 epochs: that group's chunk folder."""
    procs = launch(data, path, outs, ck, "--placement", "groups")
    chunk = ck / "spread" / "group1" / "chunk0"
    wait_for_checkpoint(chunk, procs, epochs=3)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    finish(procs)
    return chunk


def test_a_damaged_epoch_of_a_group_on_one_process_resumes_without_the_other(tmp_path,
                                                                          subset_h5):
    # Whole groups placed on processes: batch 16 trains on process 1 alone, which removes its
    # damaged epoch and resumes from the one before without waiting on process 0 (a wait that
    # process 0 would never join). 12 epochs of 64 steps: 9 left to be killed in.
    path = sweep_file(tmp_path, epochs=12)
    path.write_text(path.read_text().replace("lr = [0.003, 0.001]", "batch_size = [8, 16]"))
    whole = finish(launch(subset_h5, path, [tmp_path / "whole0", tmp_path / "whole1"],
                          tmp_path / "ck_whole", "--placement", "groups"))
    assert [r[0] for r in whole] == [0, 0], whole[0][2] + whole[1][2]
    ck, outs = tmp_path / "ck", [tmp_path / "out0", tmp_path / "out1"]
    chunk = killed_in_groups(subset_h5, path, outs, ck)
    damaged = damage_newest(chunk)
    resumed = finish(launch(subset_h5, path, outs, ck, "--placement", "groups", "--resume"))
    assert [r[0] for r in resumed] == [0, 0], resumed[0][2] + resumed[1][2]
    said = [line for r in resumed for line in r[2].splitlines() if "is damaged" in line]
    ours = [line for line in said if "group1/chunk0/" in line]
    assert len(ours) == 1 and f"group1/chunk0/{damaged}: the checkpoint of epoch" in ours[0]
    # Process 0 is killed too, and may be cut in the middle of its own group's save: its newest
    # epoch then has no manifest yet, which its resume treats as damaged as well; nothing else.
    assert all(f"no readable {population.MANIFEST}" in line
               for line in said if line not in ours), said
    assert not [r for r in resumed if "Traceback" in r[2]]
    # The same program on the same machine, resumed from a checkpoint: bit for bit.
    a, b = read(tmp_path / "whole0"), read(outs[0])
    assert a.settings == b.settings
    np.testing.assert_array_equal(a.curves, b.curves)
    np.testing.assert_array_equal(a.test_probs, b.test_probs)
    # Every kept epoch of process 1's group damaged: process 1 refuses, and process 0 stops with
    # it as soon as its own group is trained, not when JAX gives up waiting (minutes).
    ck, outs = tmp_path / "ck2", [tmp_path / "again0", tmp_path / "again1"]
    chunk = killed_in_groups(subset_h5, path, outs, ck)
    for epoch in chunk.glob(f"*/{population.MANIFEST}"):
        damage(epoch.parent, "flipped")
    begun = time.time()
    (code0, _, err0), (code1, _, err1) = finish(launch(subset_h5, path, outs, ck, "--placement",
                                                       "groups", "--resume"))
    assert time.time() - begun < 90
    assert (code0, code1) == (2, 2), err0 + err1
    assert own(err1)[-1].startswith("error: ") and "no checkpoint restores" in own(err1)[-1]
    assert err0.splitlines()[-1] == "error: process 1 of 2 refused its input", err0
    assert "Traceback" not in err0 + err1 and not (outs[0] / "spread").exists()


def test_a_failed_write_of_a_finished_chunk_stops_every_process(tmp_path, subset_h5):
    # The chunk spans both processes; process 0, which writes its results, cannot (a folder
    # stands where the file's temporary goes: the disk refuses the write, as a full one would).
    # Both stop in one line each, process 1 without waiting for process 0 at the chunk's end
    # until the runtime gives up (minutes); the checkpoints are kept, and a resume finishes.
    path = sweep_file(tmp_path, epochs=8)  # 7 left to block the write in once 1 is saved
    ck, outs = tmp_path / "ck", [tmp_path / "out0", tmp_path / "out1"]
    procs = launch(subset_h5, path, outs, ck)
    chunk = ck / "spread" / "group0" / "chunk0"
    wait_for_checkpoint(chunk, procs)
    blocker = chunk.parent / "chunk0.done.npz.tmp"
    blocker.mkdir()
    begun = time.time()
    (code0, _, err0), (code1, _, err1) = finish(procs, timeout=240)
    assert time.time() - begun < 90
    assert (code0, code1) == (1, 1), err0 + err1
    assert own(err0)[-1].startswith(f"error: {chunk.parent / 'chunk0.done.npz'}: cannot write "
                                    "(IsADirectoryError"), err0
    assert own(err1)[-1] == ("error: process 0 of 2 could not write chunk0.done.npz; its "
                             "checkpoints are kept: free space, then run the same command "
                             "with --resume"), err1
    assert "Traceback" not in err0 + err1 and not (outs[0] / "spread").exists()
    assert saved_epochs(chunk) == 8
    blocker.rmdir()
    resumed = finish(launch(subset_h5, path, outs, ck, "--resume"))
    assert [r[0] for r in resumed] == [0, 0], resumed[0][2] + resumed[1][2]
    assert "epoch 1/8" not in resumed[0][2]  # it went on from the checkpoint
    assert not np.isnan(read(outs[0]).curves).any() and not ck.exists()


def test_a_refusal_on_one_process_stops_every_process(tmp_path, shared_h5):
    path = sweep_file(tmp_path)
    port = free_port()
    ok = start(shared_h5, path, tmp_path / "out0", tmp_path / "ck", port, 2, 0)
    bad = start(shared_h5, path, tmp_path / "out1", tmp_path / "ck", port, 2, 1,
                "--data", tmp_path / "missing.h5")
    (code0, _, err0), (code1, _, err1) = finish([ok, bad], timeout=120)
    assert (code0, code1) == (2, 2), err0 + err1
    assert "error: process 1 of 2 refused its input" in err0
    assert "missing.h5" in [line for line in err1.splitlines() if line.startswith("error:")][0]
    assert "Traceback" not in err0 + err1
    assert not any(tmp_path.glob("out*")) and not (tmp_path / "ck").exists()


def test_an_unreachable_coordinator_fails_with_one_line_in_bounded_time(tmp_path, shared_h5):
    path = sweep_file(tmp_path)
    t0 = time.time()
    run = subprocess.run(
        sweep_cmd(path, tmp_path / "out", tmp_path / "ck", "--distributed", "--coordinator",
                  f"127.0.0.1:{free_port()}", "--num-processes", 2, "--process-id", 1,
                  "--init-timeout", 3),
        env=env(shared_h5, 2), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("error: cannot reach the coordinator at 127.0.0.1:")
    assert len(run.stderr.strip().splitlines()) == 1 and time.time() - t0 < 60
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_distributed_with_no_launcher_says_what_to_give(tmp_path, shared_h5):
    # Outside any cluster launcher JAX finds nothing to join: one line naming the flags.
    launchers = ("SLURM_", "OMPI_", "PMI_", "TPU_", *distributed.ENV.values())
    bare = {k: v for k, v in env(shared_h5, 2).items() if not k.startswith(launchers)}
    run = subprocess.run(sweep_cmd(sweep_file(tmp_path), tmp_path / "out", tmp_path / "ck",
                                   "--distributed"),
                         env=bare, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == ("error: --distributed: no cluster launcher found (Slurm, Open MPI, a "
                          "Cloud TPU); give --coordinator HOST:PORT, --num-processes and "
                          "--process-id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                          "JAX_PROCESS_ID)\n"), run.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_launch_settings_from_flags_and_environment():
    env_launch = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                  "JAX_PROCESS_ID": "3"}
    assert distributed.launch_settings(environ=env_launch) == distributed.Launch(
        "10.0.0.1:1234", 4, 3)
    # Flags win over the environment; nothing at all leaves it to JAX's cluster detection.
    assert distributed.launch_settings("h:1", 2, 0, 9, environ=env_launch) == \
        distributed.Launch("h:1", 2, 0, 9)
    assert distributed.launch_settings(environ={}) == distributed.Launch()
    for args, env_vars, fragment in [
            ((None, 2, 0), {}, "missing --coordinator"),
            (("h:1", None, None), {}, "missing --num-processes"),
            (("h", 2, 0), {}, "expected HOST:PORT"),
            (("h:70000", 2, 0), {}, "expected HOST:PORT"),
            (("h:1", 2, 2), {}, "expected 0 <= id < count"),
            ((None, None, None), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES")]:
        with pytest.raises(InputError, match=fragment):
            distributed.launch_settings(*args, environ=env_vars)


def test_place_groups_balances_the_costliest_first():
    assert sweep.place_groups([5, 1, 1, 3], 2) == [0, 1, 1, 1]
    assert sweep.place_groups([1, 1, 1], 2) == [0, 1, 0]
    assert sweep.place_groups([2, 7], 1) == [0, 0]


def test_resume_refuses_a_checkpoint_of_another_layout(tmp_path, subset_h5, capsys):
    path = sweep_file(tmp_path)
    ck = tmp_path / "ck"
    # A checkpoint whose groups were placed whole on processes: a run sharding members over the
    # devices would lay its chunks out differently, so it must not resume from it.
    loaded = grid.load_sweep(str(path))
    data_hash = data.content_hash(data.load(str(subset_h5)))
    sweep._prepare_checkpoints(
        ck / "spread", sweep.fingerprint(loaded, {}, data_hash, None, None, "groups", None),
        resume=False)
    code = sweep.main([str(path), "--data", str(subset_h5), "--out", str(tmp_path / "out"),
                       "--checkpoints", str(ck), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "layout (processes, devices, memory budget, chunks, placement)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("differ, fragment", [
    ("epochs", "process 1 was started with other command-line settings than process 0"),
    ("sweep", "process 1 was started with other sweep files than process 0")])
def test_processes_started_differently_refuse_together_before_training(tmp_path, subset_h5,
                                                                       differ, fragment):
    path = sweep_file(tmp_path)
    other = tmp_path / "other" / "spread.toml"
    other.parent.mkdir()
    other.write_text(SWEEP.replace("lr = [0.003, 0.001]", "lr = [0.003, 0.002]"))
    port = free_port()
    extra = {"epochs": (path, ["--epochs", "2"]), "sweep": (other, [])}[differ]
    procs = [start(subset_h5, path, tmp_path / "out0", tmp_path / "ck", port, 2, 0),
             start(subset_h5, extra[0], tmp_path / "out1", tmp_path / "ck", port, 2, 1,
                   *extra[1])]
    for code, _, err in finish(procs, timeout=300):
        assert code == 2, err
        lines = [line for line in own(err) if line.strip()]
        assert lines == [f"error: {fragment}; start every process with the same command, "
                         "sweep files and data"], err
    assert not (tmp_path / "out0").exists() and not (tmp_path / "ck").exists()


def test_a_killed_process_stops_the_others_within_the_heartbeat_timeout(tmp_path, shared_h5):
    path = sweep_file(tmp_path)
    ck = tmp_path / "ck"
    port = free_port()
    procs = [start(shared_h5, path, tmp_path / f"out{i}", ck, port, 2, i,
                   "--heartbeat-timeout", 5) for i in range(2)]
    wait_for_checkpoint(ck / "spread" / "group0" / "chunk0", procs)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    code, _, _ = finish(procs[:1], timeout=120)[0]
    assert code != 0 and time.time() - killed < 60  # not JAX's default 100 s
    assert saved_epochs(ck / "spread" / "group0" / "chunk0") >= 1  # the checkpoint survives
