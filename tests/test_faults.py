"""Faults that clusters and laptops produce, each with its exact outcome (README, "Reliability"):
SIGTERM, a damaged checkpoint, other data on resume, two runs at once, a run beside another's
checkpoints, a result folder that is not the engine's, and a full disk. A continued run is
bit-identical to an uninterrupted one: the same program on the same inputs."""

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from uspsjax import lock as lock_module, population, results, sweep
from uspsjax.lock import Lock

# A damaged checkpoint is said in one line: an exception that orbax's threads leave behind
# (printed at exit in a real process) fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

SWEEP = """
name = "faulty"
networks = ["fc"]
seeds = 2
[base]
epochs = 3
batch_size = 64
lr = 0.02
momentum = 0.9
"""
CHUNK = ("faulty", "group0", "chunk0")  # where the orbax epochs of the one chunk live


def argv(tmp_path, data, *extra):
    return [str(tmp_path / "faulty.toml"), "--data", str(data), "--out", str(tmp_path / "out"),
            "--checkpoints", str(tmp_path / "ck"), "--quiet", *map(str, extra)]


def run(capsys, args) -> tuple[int, str]:
    """`python -m uspsjax.sweep ARGS` in this process: (status, stderr)."""
    code = sweep.main(args)
    return code, capsys.readouterr().err


def one_error(err: str, fragment: str) -> None:
    """stderr is exactly one `error:` line holding `fragment`, and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert "Traceback" not in err


def snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def arrays(folder) -> dict:
    run_ = results.read_metrics(folder / "faulty" / "metrics.h5")
    return {k: getattr(run_, k) for k in ("curves", "test_probs", "diverged")}


def assert_same(a: dict, b: dict) -> None:
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, subset_h5):
    """The uninterrupted run's arrays."""
    tmp = tmp_path_factory.mktemp("whole")
    (tmp / "faulty.toml").write_text(SWEEP)
    assert sweep.main(argv(tmp, subset_h5)) == 0
    return arrays(tmp / "out")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, subset_h5):
    """A run stopped by a real SIGTERM right after its checkpoint of epoch 2 was saved, as a
    scheduler stops a job, once for the module: (its folder, its stderr)."""
    tmp = tmp_path_factory.mktemp("stopped")
    (tmp / "faulty.toml").write_text(SWEEP)
    save = population._save_epoch

    def save_then_signal(manager, epoch, *rest):
        save(manager, epoch, *rest)
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(io.StringIO()) as err:
        patch.setattr(population, "_save_epoch", save_then_signal)
        code = sweep.main(argv(tmp, subset_h5))
    assert code == 143, err.getvalue()
    return tmp, err.getvalue()


@pytest.fixture
def terminated(stopped, tmp_path):
    """A copy of the stopped run's sweep file and checkpoints in `tmp_path` (each test may
    damage its own): returns the stopped run's stderr."""
    folder, err = stopped
    shutil.copy(folder / "faulty.toml", tmp_path / "faulty.toml")
    shutil.copytree(folder / "ck", tmp_path / "ck")
    return err


def test_sigterm_keeps_the_checkpoint_and_says_how_to_resume(terminated, tmp_path, subset_h5,
                                                             capsys, whole):
    assert "terminated: the last completed epoch is checkpointed in" in terminated
    assert "--resume" in terminated and "Traceback" not in terminated
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    chunk = tmp_path / "ck" / os.path.join(*CHUNK)
    assert sorted(p.name for p in chunk.iterdir() if p.name.isdigit()) == ["1", "2"]
    assert not (tmp_path / "out" / "faulty").exists()
    code, err = run(capsys, argv(tmp_path, subset_h5, "--resume"))
    assert code == 0, err
    assert_same(arrays(tmp_path / "out"), whole)
    assert not (tmp_path / "ck").exists()  # a finished run removes its own checkpoints


def damage(path, how: str) -> None:
    """Damage one epoch's checkpoint folder `path` as disks and people do."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.stat().st_size > 0)
    biggest = max(files, key=lambda p: p.stat().st_size)
    if how == "truncated":
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    elif how == "deleted":
        biggest.unlink()
    elif how == "flipped":  # one bit, as a failing disk or memory changes it
        data = bytearray(biggest.read_bytes())
        data[len(data) // 2] ^= 0x10
        biggest.write_bytes(bytes(data))
    elif how == "random":
        biggest.write_bytes(np.random.default_rng(0).bytes(biggest.stat().st_size))
    elif how == "emptied":
        shutil.rmtree(path)
        path.mkdir()
    elif how == "metadata":
        for meta in path.rglob("_METADATA"):
            meta.write_bytes(b"\xff\xfe not orbax metadata")


@pytest.mark.parametrize("how", ["truncated", "deleted", "flipped", "random", "emptied",
                                 "metadata"])
def test_a_damaged_latest_epoch_resumes_from_the_one_before(terminated, tmp_path, subset_h5,
                                                            capsys, whole, how):
    chunk = tmp_path / "ck" / os.path.join(*CHUNK)
    damage(chunk / "2", how)
    code, err = sweep.main(argv(tmp_path, subset_h5, "--resume")), capsys.readouterr().err
    assert code == 0, err
    said = [line for line in err.splitlines() if line.strip()]
    assert len(said) == 1 and "the checkpoint of epoch 2 is damaged" in said[0], err
    assert "resuming from epoch 1" in said[0] and "Traceback" not in err
    assert_same(arrays(tmp_path / "out"), whole)


def test_an_epoch_whose_save_was_cut_short_is_removed_unsaid(terminated, tmp_path, subset_h5,
                                                             capsys, caplog, whole):
    unfinished = tmp_path / "ck" / os.path.join(*CHUNK) / "3.orbax-checkpoint-tmp"
    (unfinished / "default").mkdir(parents=True)
    (unfinished / "default" / "partial").write_bytes(b"half an epoch")
    code, err = run(capsys, argv(tmp_path, subset_h5, "--resume"))
    assert code == 0 and err == "", err
    assert not [r for r in caplog.records if "tmp" in r.getMessage()]  # orbax's own warning
    assert_same(arrays(tmp_path / "out"), whole)


def test_no_epoch_that_restores_is_refused_in_one_line(terminated, tmp_path, subset_h5, capsys):
    chunk = tmp_path / "ck" / os.path.join(*CHUNK)
    damage(chunk / "2", "random")
    damage(chunk / "1", "truncated")
    code, err = run(capsys, argv(tmp_path, subset_h5, "--resume"))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "no checkpoint restores" in lines[-1]
    assert str(chunk) in lines[-1] and "Traceback" not in err
    assert not (tmp_path / "out" / "faulty").exists()


@pytest.mark.parametrize("stamp", [b"\xff\xfe\x00garbage", b"{\"sweep\": ", b"[1, 2]"])
def test_a_damaged_sweep_record_is_refused_in_one_line(terminated, tmp_path, subset_h5, capsys,
                                                       stamp):
    (tmp_path / "ck" / "faulty" / "sweep.json").write_bytes(stamp)
    code, err = run(capsys, argv(tmp_path, subset_h5, "--resume"))
    assert code == 2
    one_error(err, "sweep.json: damaged")


def test_resume_on_other_data_is_refused(terminated, tmp_path, subset_h5, capsys):
    other = tmp_path / "other.h5"
    shutil.copy(subset_h5, other)
    with h5py.File(other, "r+") as f:  # the same size, one pixel changed
        f["train/data"][0, 0] = 1.0 - f["train/data"][0, 0]
    before = snapshot(tmp_path / "ck")
    code, err = run(capsys, [*argv(tmp_path, other, "--resume")])
    assert code == 2
    one_error(err, "another data (the arrays' SHA-256)")
    assert "--resume needs the same data" in err
    assert snapshot(tmp_path / "ck") == before


def test_a_second_run_of_the_sweep_is_refused_while_one_runs(tmp_path, subset_h5, capsys):
    (tmp_path / "faulty.toml").write_text(SWEEP)
    holder = Lock(tmp_path / "out" / ".faulty.lock", "results")  # the first run's lock
    try:
        code, err = run(capsys, argv(tmp_path, subset_h5))
    finally:
        holder.release()
    assert code == 2
    one_error(err, f"another run (pid {os.getpid()}) is writing it now")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "out" / "faulty").exists()
    # A lock whose process has ended blocks nothing, whatever pid its file names.
    code, err = run(capsys, argv(tmp_path, subset_h5))
    assert code == 0, err


def test_a_run_without_checkpoints_leaves_another_runs_checkpoints(terminated, tmp_path,
                                                                   subset_h5, capsys):
    before = snapshot(tmp_path / "ck")
    code, err = run(capsys, [*argv(tmp_path, subset_h5, "--no-checkpoints"), "--out",
                             str(tmp_path / "elsewhere")])
    assert code == 0, err
    assert snapshot(tmp_path / "ck") == before


@pytest.mark.parametrize("what", ["file", "foreign"])
def test_a_result_folder_that_is_not_the_engines_is_refused_before_training(
        tmp_path, subset_h5, capsys, what):
    (tmp_path / "faulty.toml").write_text(SWEEP)
    target = tmp_path / "out" / "faulty"
    target.parent.mkdir()
    if what == "file":
        target.write_text("my notes")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path / "out")
    code, err = run(capsys, argv(tmp_path, subset_h5))
    assert code == 2
    one_error(err, "not a uspsjax result folder" if what == "file" else "which uspsjax did not")
    assert snapshot(tmp_path / "out") == before and not (tmp_path / "ck").exists()


def test_a_full_disk_keeps_the_earlier_result_and_the_training(tmp_path, subset_h5, capsys,
                                                               monkeypatch, whole):
    (tmp_path / "faulty.toml").write_text(SWEEP.replace("epochs = 3", "epochs = 1"))
    assert sweep.main(argv(tmp_path, subset_h5)) == 0  # the earlier result
    capsys.readouterr()
    (tmp_path / "faulty.toml").write_text(SWEEP)
    before = snapshot(tmp_path / "out")
    write = results.write_metrics

    def full(path, run_):
        with open(path, "wb") as f:
            f.write(b"\x89HDF\r\n")  # what was written before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(results, "write_metrics", full)
    code, err = run(capsys, argv(tmp_path, subset_h5))
    assert code == 1
    one_error(err, "No space left on device")
    assert "the earlier result is untouched" in err and "--resume" in err
    assert snapshot(tmp_path / "out") == before  # no temporary folder either
    monkeypatch.setattr(results, "write_metrics", write)
    trained = []
    monkeypatch.setattr(population, "_save_epoch", lambda *a: trained.append(a))
    code, err = run(capsys, argv(tmp_path, subset_h5, "--resume"))
    assert code == 0, err
    assert trained == []  # the result is written from the checkpoint, nothing retrained
    assert_same(arrays(tmp_path / "out"), whole)


@pytest.mark.parametrize("when, said", [
    ("before", "chunk0: cannot write the checkpoint of epoch 3"),
    ("midway", "chunk0: cannot write the checkpoint of epoch 3"),
    ("finished", "chunk0.done.npz: cannot write")])
def test_a_full_disk_while_checkpointing_stops_in_one_line_and_resumes(tmp_path, subset_h5, capsys,
                                                                      monkeypatch, whole, when,
                                                                      said):
    # The disk fills as epoch 3 is checkpointed: seen before writing (too little space free),
    # or by orbax part way through its write (tensorstore's error, a temporary folder left);
    # or as the finished chunk's results replace its checkpoints.
    (tmp_path / "faulty.toml").write_text(SWEEP)
    chunk = tmp_path / "ck" / os.path.join(*CHUNK)
    if when == "finished":
        def full(file, **arrays):
            file.write(b"PK\x03\x04")  # what was written before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(population.np, "savez", full)
    elif when == "before":
        usage = shutil.disk_usage

        def filling(path):  # room for the first two epochs only
            full = len(list(chunk.glob(f"*/{population.MANIFEST}"))) >= 2
            return usage(path)._replace(free=0) if full else usage(path)

        monkeypatch.setattr(shutil, "disk_usage", filling)
    else:
        save = population._save_epoch

        def midway(manager, epoch, *rest):
            if epoch == 3:
                (chunk / "3.orbax-checkpoint-tmp" / "default").mkdir(parents=True)
                raise ValueError("RESOURCE_EXHAUSTED: Error writing ...: No space left on device")
            save(manager, epoch, *rest)

        monkeypatch.setattr(population, "_save_epoch", midway)
    code, err = run(capsys, argv(tmp_path, subset_h5))
    assert code == 1
    one_error(err, said)
    assert "No space left on device" in err and "--resume" in err
    kept = ["2", "3"] if when == "finished" else ["1", "2"]
    assert sorted(p.name for p in chunk.iterdir() if p.name.isdigit()) == kept
    assert not list(chunk.parent.glob("*.tmp")) and not (tmp_path / "out" / "faulty").exists()
    monkeypatch.undo()
    code, err = run(capsys, argv(tmp_path, subset_h5, "--resume"))
    assert code == 0 and err == "", err
    assert_same(arrays(tmp_path / "out"), whole)


def test_a_full_disk_before_anything_runs_is_refused_in_one_line(tmp_path, subset_h5, capsys,
                                                                 monkeypatch):
    (tmp_path / "faulty.toml").write_text(SWEEP)

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock_module.os, "write", full)
    code, err = run(capsys, argv(tmp_path, subset_h5))
    assert code == 2
    one_error(err, "cannot write its lock")
    assert "No space left on device" in err and not (tmp_path / "out" / "faulty").exists()


def test_resume_with_other_versions_is_refused(terminated, tmp_path, subset_h5, capsys):
    stamp = tmp_path / "ck" / "faulty" / "sweep.json"
    record = json.loads(stamp.read_text())
    record["versions"]["jax"] = "0.0.1"  # as a checkpoint of an older jax would say
    stamp.write_text(json.dumps(record))
    code, err = run(capsys, argv(tmp_path, subset_h5, "--resume"))
    assert code == 2
    one_error(err, "another versions of uspsjax, its source or its libraries")


def test_sigterm_to_a_training_process_ends_it_at_once_with_143(tmp_path, shared_h5):
    # A real process mid-epoch (the full training set at batch 8: seconds per epoch), stopped
    # as a scheduler stops it: the status and the line at once, not after the epoch.
    (tmp_path / "faulty.toml").write_text(SWEEP.replace("batch_size = 64", "batch_size = 8")
                                          .replace("epochs = 3", "epochs = 50"))
    proc = subprocess.Popen([sys.executable, "-m", "uspsjax.sweep",
                             *argv(tmp_path, shared_h5)[:-1]], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    chunk = tmp_path / "ck" / os.path.join(*CHUNK)
    start = time.time()
    while not (chunk / "1").is_dir():
        assert proc.poll() is None and time.time() - start < 300, "no checkpoint appeared"
        time.sleep(0.1)
    time.sleep(0.5)  # well inside the next epoch
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and time.time() - sent < 10, err
    assert "terminated: the last completed epoch is checkpointed" in err
    assert "Traceback" not in err


def test_a_stop_during_a_checkpoint_write_acts_once_the_write_is_done():
    # SIGTERM inside `_stops_deferred` (around each checkpoint write) is held until the block
    # ends, then raised by the handler the command line set, as if it had just arrived.
    script = """
import os, signal, sys
from uspsjax.population import _stops_deferred

def stop(signum, frame):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, stop)
try:
    with _stops_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10**6))  # the interpreter runs handlers between bytecodes
        print("written", flush=True)
except KeyboardInterrupt:
    print("stopped after", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120)
    assert proc.stdout.split("\n")[:2] == ["written", "stopped after"], proc.stderr
