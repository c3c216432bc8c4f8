"""The command line: a real sweep end to end, and a matrix of bad inputs, each a one-line error
with exit status 2, no traceback, and nothing written."""

import functools
import http.server
import os
import subprocess
import sys
import threading

import h5py
import numpy as np
import pytest

from uspsjax import results, sweep

TINY = """
name = "tiny"
description = "a tiny lr sweep"
networks = ["fc"]
seeds = 2
[base]
epochs = 2
batch_size = 64
momentum = 0.9
[axes]
lr = [0.01, 50.0]
"""


def run_main(capsys, *argv):
    code = sweep.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sweep_end_to_end(tmp_path, shared_h5, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    out = tmp_path / "results"
    code, stdout, stderr = run_main(capsys, str(path), "--data", str(shared_h5), "--out",
                                    str(out), "--checkpoints", str(tmp_path / "ck"))
    assert code == 0, stderr
    assert "4 members in 1 static groups -> 1 compiled training programs" in stderr
    assert "samples/s" in stderr and "s left" in stderr
    run = results.read_metrics(out / "tiny" / "metrics.h5")
    assert run["curves"].shape == (4, 2, 4) and run["programs"] == 1
    lr = [s["lr"] for s in run["settings"]]
    assert lr == [0.01, 0.01, 50.0, 50.0]
    healthy = run["curves"][:2, -1, 3]
    assert np.all(healthy > 0.85)  # FC at lr 0.01, momentum 0.9 learns within 2 epochs
    assert np.all(run["diverged"][2:] >= 1) and np.all(run["diverged"][:2] == 0)
    assert "| fc | lr=50.0 | 2 | diverged (2/2) |" in stdout
    assert sorted(p.name for p in (out / "tiny").iterdir()) == [
        "accuracy.png", "loss.png", "metrics.h5", "summary.md"]
    assert not (tmp_path / "ck" / "tiny").exists()  # checkpoints go once results are written
    # --quiet silences progress; overrides reach every member and are recorded.
    code, _, stderr = run_main(capsys, str(path), "--data", str(shared_h5), "--out", str(out),
                               "--checkpoints", str(tmp_path / "ck"), "--epochs", "1", "--quiet",
                               "--dtype", "bfloat16")
    assert code == 0 and stderr == ""
    run = results.read_metrics(out / "tiny" / "metrics.h5")
    assert run["overrides"] == {"epochs": 1, "dtype": "bfloat16"}
    assert [s["dtype"] for s in run["settings"]] == ["bfloat16"] * 4
    assert np.all(run["curves"][:2, -1, 3] > 0.8)


def test_list(capsys):
    code, out, _ = run_main(capsys, "--list")
    assert code == 0 and "lr " in out and "baseline" in out


def _h5(path, mutate=None, **arrays):
    base = {"train/data": np.random.default_rng(0).random((20, 256), np.float32),
            "train/target": np.arange(20, dtype=np.int32) % 10,
            "test/data": np.random.default_rng(1).random((10, 256), np.float32),
            "test/target": np.arange(10, dtype=np.int32)}
    base.update(arrays)
    with h5py.File(path, "w") as f:
        for k, v in base.items():
            if v is not None:
                f[k] = v
    return path


def bad_data(tmp_path, kind):
    p = tmp_path / f"{kind}.h5"
    if kind == "missing":
        return p
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "not-hdf5":
        p.write_text("pixels,label\n0.5,3\n")
    elif kind == "truncated":
        good = _h5(tmp_path / "good.h5")
        p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "wrong-groups":
        _h5(p, **{"test/data": None, "test/target": None})
    elif kind == "wrong-shape":
        _h5(p, **{"train/data": np.zeros((20, 255), np.float32)})
    elif kind == "wrong-dtype":
        _h5(p, **{"train/data": np.zeros((20, 256), np.complex64)})
    elif kind == "nan-pixels":
        x = np.zeros((20, 256), np.float32)
        x[3, 7] = np.nan
        _h5(p, **{"train/data": x})
    elif kind == "labels-out-of-range":
        _h5(p, **{"test/target": np.full(10, 12, np.int32)})
    return p


DATA_CASES = {"missing": "no such file", "empty": "", "not-hdf5": "", "truncated": "",
              "wrong-groups": "test", "wrong-shape": "shape", "wrong-dtype": "",
              "nan-pixels": "", "labels-out-of-range": ""}


def assert_one_line_error(code, out, err, fragment=""):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and fragment in lines[0]


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


@pytest.fixture
def earlier(tmp_path):
    """An output folder holding an earlier complete result, to check nothing is overwritten."""
    out = tmp_path / "results"
    (out / "lr").mkdir(parents=True)
    (out / "lr" / "summary.md").write_text("earlier result\n")
    return out


@pytest.mark.parametrize("kind", list(DATA_CASES))
def test_bad_data_file(tmp_path, capsys, earlier, kind):
    path = bad_data(tmp_path, kind)
    before = snapshot(earlier)
    code, out, err = run_main(capsys, "lr", "--networks", "fc", "--data", str(path), "--out",
                              str(earlier), "--checkpoints", str(tmp_path / "ck"))
    assert_one_line_error(code, out, err, str(path))
    assert DATA_CASES[kind] in err
    assert snapshot(earlier) == before and not (tmp_path / "ck").exists()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_failed_checksum_of_a_download(tmp_path, capsys, monkeypatch, earlier):
    (tmp_path / "www").mkdir()
    for name in ("usps.bz2", "usps.t.bz2"):
        (tmp_path / "www" / name).write_bytes(b"not the USPS data")
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "www"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for var in ("USPSJAX_DATA", "http_proxy", "HTTP_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        monkeypatch.setenv("USPSJAX_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}")
        code, out, err = run_main(capsys, "lr", "--networks", "fc", "--out", str(earlier))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert_one_line_error(code, out, err, "checksum")
    cache = tmp_path / "cache" / "uspsjax"
    assert not cache.exists() or list(cache.iterdir()) == []


SWEEP_CASES = {
    "syntax": ("name = 'x'\n[base\n", "not valid TOML"),
    "unknown-key": ("name = 'x'\nfoo = 1\n", "unknown key 'foo'"),
    "unknown-network": ("name = 'x'\nnetworks = ['resnet']\n", "unknown network 'resnet'"),
    "unknown-init": ("name = 'x'\n[axes]\ninit = ['xavier']\n", "unknown initializer 'xavier'"),
    "wrong-type": ("name = 'x'\n[base]\nepochs = '10'\n", "epochs must be an integer"),
    "empty-axis": ("name = 'x'\n[axes]\nmomentum = []\n", "non-empty list"),
    "negative-lr": ("name = 'x'\n[axes]\nlr = [-0.1]\n", "lr = -0.1 is impossible"),
    "momentum-1": ("name = 'x'\n[base]\nmomentum = 1.5\n", "momentum = 1.5 is impossible"),
    "batch-too-big": ("name = 'x'\n[base]\nbatch_size = 10000\n", "batch_size = 10000"),
}


@pytest.mark.parametrize("case", list(SWEEP_CASES))
def test_bad_sweep_file(tmp_path, capsys, earlier, shared_h5, case):
    text, fragment = SWEEP_CASES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    before = snapshot(earlier)
    code, out, err = run_main(capsys, str(path), "--data", str(shared_h5), "--out", str(earlier))
    assert_one_line_error(code, out, err, fragment)
    assert str(path) in err and snapshot(earlier) == before


def cli_cases(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {
        "unknown-sweep": (["nonesuch"], "no such sweep"),
        "epochs-zero": (["lr", "--epochs", "0"], "positive integer"),
        "epochs-text": (["lr", "--epochs", "ten"], "positive integer"),
        "seeds-negative": (["lr", "--seeds", "-2"], "positive integer"),
        "unknown-flag": (["lr", "--learning-rate", "3"], "unrecognized arguments"),
        "bad-dtype": (["lr", "--dtype", "float16"], "invalid choice"),
        "bad-network": (["lr", "--networks", "fc,rnn"], "unknown network 'rnn'"),
        "too-many-devices": (["lr", "--networks", "fc", "--devices", "64"], "--devices 64"),
        "nothing-to-resume": (["lr", "--resume", "--checkpoints", str(tmp_path / "none")],
                              "nothing to resume"),
        "out-is-a-file": (["lr", "--out", str(a_file)], "is a file"),
        "out-not-writable": (["lr", "--out", "/proc/uspsjax-results"], "not writable"),
        "no-sweep": ([], "no sweep given"),
    }


@pytest.mark.parametrize("case", ["unknown-sweep", "epochs-zero", "epochs-text",
                                  "seeds-negative", "unknown-flag", "bad-dtype", "bad-network",
                                  "too-many-devices", "nothing-to-resume", "out-is-a-file",
                                  "out-not-writable", "no-sweep"])
def test_bad_command_line(tmp_path, capsys, earlier, shared_h5, case):
    argv, fragment = cli_cases(tmp_path)[case]
    if "--out" not in argv:
        argv = argv + ["--out", str(earlier)]
    before = snapshot(earlier)
    try:
        code, out, err = run_main(capsys, *argv, "--data", str(shared_h5))
    except SystemExit as exit_:  # argparse exits by itself
        code, (out, err) = exit_.code, capsys.readouterr()
    assert_one_line_error(code, out, err, fragment)
    assert snapshot(earlier) == before


def test_bad_input_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "uspsjax.sweep", "lr", "--epochs", "-1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--epochs" in proc.stderr
