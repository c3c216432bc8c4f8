"""Bad input is refused before anything trains, by every command: exit status 2, exactly one line
`error: ...` on stderr (no traceback), nothing written to --out or --checkpoints, within seconds.

Cases run `main([...])` in-process (fast); a few run the real `python -m` entry point. Training
is replaced by a failure (`no_training`), so a case refused only after training fails at once;
cases that are not about the sweep file use a tiny valid sweep and a tiny valid data file.
"""

import functools
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from uspsjax import bench, profile, report, sweep

TINY = 'name = "tiny"\nnetworks = ["fc"]\nseeds = 1\n[base]\nepochs = 1\nbatch_size = 8\n'
LIMIT_S = 30  # generous for a shared CI machine; a refusal takes well under a second


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Refusals come before training: a case that reaches `run_sweep` fails at once."""
    def train(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(sweep, "run_sweep", train)


def tiny_h5(path: Path, **override) -> Path:
    """A small valid USPS-layout file (20 train, 10 test); override[key] replaces a dataset,
    None drops it."""
    rng = np.random.default_rng(0)
    arrays = {"train/data": rng.random((20, 256), np.float32),
              "train/target": np.arange(20, dtype=np.int32) % 10,
              "test/data": rng.random((10, 256), np.float32),
              "test/target": np.arange(10, dtype=np.int32)}
    arrays.update(override)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f.create_dataset(key, data=value)
    return path


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes ({} when there is none)."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def assert_refused(capsys, main, argv, fragment, out: Path, checkpoints: Path | None = None):
    """Run `main(argv)` and check the refusal: status 2, one `error:` line holding `fragment`,
    no output, `out` unchanged (absent or empty when it started so), no checkpoints."""
    before = snapshot(out)
    t0 = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - t0
    stdout, stderr = capsys.readouterr()
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and stdout == ""
    assert fragment in lines[0], lines[0]
    assert snapshot(out) == before
    assert before or not out.exists() or not any(out.iterdir())
    assert checkpoints is None or not checkpoints.exists()
    assert elapsed < LIMIT_S
    return lines[0]


def refuse_sweep(capsys, tmp_path, argv, fragment, out=None):
    """A refused `python -m uspsjax.sweep ARGV` (with --out, --checkpoints and --data in
    tmp_path unless the case gives its own)."""
    out = out or tmp_path / "out"
    checkpoints = tmp_path / "ck"
    extra = [] if "--out" in argv else ["--out", str(out)]
    if "--data" not in argv:
        extra += ["--data", str(tiny_h5(tmp_path / "tiny.h5"))]
    argv = [*argv, *extra, "--checkpoints", str(checkpoints)]
    return assert_refused(capsys, sweep.main, argv, fragment, out, checkpoints)


# --- sweep files ------------------------------------------------------------------------------

def _many(n: int) -> str:
    return "[" + ", ".join(f"{1e-3 + i * 1e-9:.9g}" for i in range(n)) + "]"


SWEEP_FILES = {
    # semantically impossible values
    "negative-lr": ("name = 'x'\n[axes]\nlr = [-0.1]\n", "lr = -0.1 is impossible"),
    "nan-lr": ("name = 'x'\n[base]\nlr = nan\n", "lr = nan is impossible"),
    "momentum-1": ("name = 'x'\n[base]\nmomentum = 1.0\n", "momentum = 1.0 is impossible"),
    "momentum-1.5": ("name = 'x'\n[base]\nmomentum = 1.5\n", "momentum = 1.5 is impossible"),
    "dropout-1": ("name = 'x'\n[base]\ndropout_dense = 1.0\n", "dropout_dense = 1.0 is impossible"),
    "epochs-0": ("name = 'x'\n[base]\nepochs = 0\n", "epochs = 0 is impossible"),
    "seeds-0": ("name = 'x'\nseeds = 0\n", "seeds must be a positive integer"),
    "cpu-ensemble-0": ("name = 'x'\n[ensemble]\nsize = 4\n[cpu.lc]\nensemble = 0\n",
                       "cpu.lc.ensemble must be a positive integer"),
    "batch-too-big": ("name = 'x'\n[base]\nbatch_size = 10000\n", "batch_size = 10000"),
    "wrong-type": ("name = 'x'\n[base]\nepochs = '10'\n", "epochs must be an integer"),
    "empty-axis": ("name = 'x'\n[axes]\nmomentum = []\n", "non-empty list"),
    # unknown names
    "unknown-key": ("name = 'x'\nfoo = 1\n", "unknown key 'foo'"),
    "unknown-setting": ("name = 'x'\n[base]\nlearning_rate = 0.1\n",
                        "unknown setting 'learning_rate'"),
    "unknown-network": ("name = 'x'\nnetworks = ['resnet']\n", "unknown network 'resnet'"),
    "unknown-network-table": ("name = 'x'\n[per_network.rnn]\nepochs = 1\n",
                              "unknown network 'rnn'"),
    "unknown-init": ("name = 'x'\n[axes]\ninit = ['xavier']\n", "unknown initializer 'xavier'"),
    # odd bytes and encodings
    "invalid-utf8": (b"name = 'caf\xe9'\n", "not UTF-8 text"),
    "bom": (b"\xef\xbb\xbfname = 'x'\n", "byte-order mark"),
    "nul-bytes": (b"name = 'x'\n\0\0\0", "NUL bytes"),
    "binary-garbage": (b"\x89PNG\r\n\x1a\n" + bytes(range(1, 256)) * 4, "not UTF-8 text"),
    "empty-file": (b"", "is empty"),
    "syntax": ("name = 'x'\n[base\n", "not valid TOML"),
    "utf16": ("name = 'x'\n".encode("utf-16"), "not UTF-8 text"),
    # grids too large to train
    # (written when the case runs; ten times the limit: a million values took 10 s to parse)
    "axis-of-100k": (lambda: f"name = 'x'\nnetworks = ['fc']\nseeds = 1\n[axes]\n"
                             f"lr = {_many(10**5)}\n", "the grid has 100,000 members"),
    "exploding-product": (lambda: "name = 'x'\n[axes]\n" + "".join(
        f"{k} = {_many(100)}\n" for k in ("lr", "l1", "init_scale", "adv_eps")),
        "the grid has 900,000,000 members"),
    "exploding-ensemble": ("name = 'x'\nnetworks = ['fc']\nseeds = 1\n[ensemble]\nsize = 100000\n",
                           "the grid has 100,000 members"),
    # names that would write outside the results folder (or clash with what sweep writes)
    "name-parent": ("name = '../x'\n", "name must be a non-empty string"),
    "name-absolute": ("name = '/tmp/x'\n", "name must be a non-empty string"),
    "name-separator": ("name = 'a/b'\n", "name must be a non-empty string"),
    "name-backslash": ("name = 'a\\\\b'\n", "name must be a non-empty string"),
    "name-dot": ("name = '.'\n", "name must be a non-empty string"),
    "name-dotdot": ("name = '..'\n", "name must be a non-empty string"),
    "name-empty": ("name = ''\n", "name must be a non-empty string"),
    "name-missing": ("networks = ['fc']\n", "name must be a non-empty string"),
    "name-lower-scale": ("name = 'lr.lower-scale'\n", "name must be a non-empty string"),
}


@pytest.mark.parametrize("case", list(SWEEP_FILES))
def test_bad_sweep_file(tmp_path, capsys, case):
    content, fragment = SWEEP_FILES[case]
    path = tmp_path / f"{case}.toml"
    content = content() if callable(content) else content
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    line = refuse_sweep(capsys, tmp_path, [str(path)], fragment)
    assert str(path) in line


# --- data files -------------------------------------------------------------------------------

def _with(**value):
    """A maker of a tiny file with one dataset replaced (or dropped with None)."""
    return lambda path: tiny_h5(path, **{k.replace("__", "/"): v for k, v in value.items()})


def _pixels(value):
    x = np.full((20, 256), 0.5, np.float32)
    x[3, 7] = value
    return x


def _truncated(path):
    whole = tiny_h5(path.with_name("whole.h5"), **{"train/data": np.ones((400, 256), np.float32),
                                                    "train/target": np.zeros(400, np.int32)})
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])


DATA_FILES = {  # (write the file at path, the error line holds this with {path} filled in)
    "missing": (lambda path: None, "{path}: no such file"),
    "empty": (lambda path: path.write_bytes(b""), "{path}: not an HDF5 file"),
    "not-hdf5": (lambda path: path.write_text("pixels,label\n0.5,3\n"), "{path}: not an HDF5 file"),
    "truncated": (_truncated, "{path}: "),
    "missing-group": (_with(test__data=None, test__target=None), "{path}: test/data is missing"),
    "missing-dataset": (_with(train__target=None), "{path}: train/target is missing"),
    "wrong-shape": (_with(train__data=np.zeros((20, 255), np.float32)),
                    "{path}: train/data has shape (20, 255), expected (N, 256)"),
    "1-d-data": (_with(train__data=np.zeros(5120, np.float32)), "{path}: train/data has shape"),
    "2-d-target": (_with(train__target=np.zeros((20, 1), np.int32)),
                   "{path}: train/target has shape"),
    "empty-split": (_with(test__data=np.zeros((0, 256), np.float32),
                          test__target=np.zeros(0, np.int32)), "{path}: test/data is empty"),
    "string-pixels": (_with(train__data=np.full((20, 256), b"0.5")),
                      "{path}: train/data has dtype |S3, expected floats"),
    "complex-pixels": (_with(train__data=np.zeros((20, 256), np.complex64)),
                       "{path}: train/data has dtype complex64, expected floats"),
    "float-labels": (_with(train__target=np.arange(20, dtype=np.float32)),
                     "{path}: train/target has dtype float32, expected integers"),
    "string-labels": (_with(test__target=np.array([b"1"] * 10)),
                      "{path}: test/target has dtype |S1, expected integers"),
    "nan-pixels": (_with(train__data=_pixels(np.nan)), "{path}: train/data has non-finite values"),
    "inf-pixels": (_with(test__data=_pixels(np.inf)[:10]),
                   "{path}: test/data has non-finite values"),
    "pixels-above-1": (_with(train__data=np.full((20, 256), 1.5, np.float32)),
                       "{path}: train/data has values in [1.5, 1.5], expected [0, 1]"),
    "pixels-below-0": (_with(test__data=np.full((10, 256), -0.1, np.float32)),
                       "{path}: test/data has values in [-0.1, -0.1], expected [0, 1]"),
    "label-10": (_with(train__target=np.full(20, 10, np.int32)),
                 "{path}: train/target has labels in [10, 10], expected 0..9"),
    "label-minus-1": (_with(test__target=np.full(10, -1, np.int64)),
                      "{path}: test/target has labels in [-1, -1], expected 0..9"),
    "mismatched-lengths": (_with(train__target=np.arange(19, dtype=np.int32) % 10),
                           "{path}: train/target has 19 labels but train/data has 20 rows"),
    # valid data, but too few training samples for the sweep's batch
    "batch-larger-than-train": (_with(train__data=np.ones((5, 256), np.float32),
                                      train__target=np.arange(5, dtype=np.int32)),
                                "tiny.toml: batch_size = 8 exceeds the 5 training samples"),
}


@pytest.mark.parametrize("case", list(DATA_FILES))
def test_bad_data_file(tmp_path, capsys, case):
    make, fragment = DATA_FILES[case]
    path = tmp_path / f"{case}.h5"
    make(path)
    (tmp_path / "tiny.toml").write_text(TINY)
    refuse_sweep(capsys, tmp_path, [str(tmp_path / "tiny.toml"), "--data", str(path)],
                 fragment.format(path=path))


# --- flags ------------------------------------------------------------------------------------

FLAGS = {  # (argv with {tiny} a valid tiny sweep file and {file} a plain file, error fragment)
    "unknown-sweep": (["nonesuch"], "no such sweep"),
    "no-sweep": ([], "no sweep given"),
    "epochs-zero": (["{tiny}", "--epochs", "0"], "--epochs: expected a positive integer"),
    "epochs-text": (["{tiny}", "--epochs", "ten"], "--epochs: expected a positive integer"),
    "seeds-negative": (["{tiny}", "--seeds", "-1"], "--seeds: expected a positive integer"),
    "seeds-a-million": (["{tiny}", "--seeds", "1000000"], "the grid has 1,000,000 members"),
    "devices-zero": (["{tiny}", "--devices", "0"], "--devices: expected a positive integer"),
    "devices-too-many": (["{tiny}", "--devices", "4096"], "--devices 4096: only"),
    "unknown-network": (["{tiny}", "--networks", "fc,rnn"], "unknown network 'rnn'"),
    "empty-networks": (["{tiny}", "--networks", ""], "--networks: unknown network ''"),
    "bad-dtype": (["{tiny}", "--dtype", "float16"], "invalid choice: 'float16'"),
    "unknown-flag": (["{tiny}", "--learning-rate", "3"], "unrecognized arguments: --learning-rate"),
    "flag-without-value": (["{tiny}", "--epochs"], "expected one argument"),
    "out-is-a-file": (["{tiny}", "--out", "{file}"], "the output folder is a file"),
    "out-not-writable": (["{tiny}", "--out", "/proc/uspsjax-results"], "not writable"),
    "nothing-to-resume": (["{tiny}", "--resume"], "nothing to resume"),
    "resume-without-checkpoints": (["{tiny}", "--resume", "--no-checkpoints"], "nothing to resume"),
}


@pytest.mark.parametrize("case", list(FLAGS))
def test_bad_flag(tmp_path, capsys, case):
    argv, fragment = FLAGS[case]
    (tmp_path / "tiny.toml").write_text(TINY)
    (tmp_path / "a-file").write_text("x")
    argv = [a.format(tiny=tmp_path / "tiny.toml", file=tmp_path / "a-file") for a in argv]
    refuse_sweep(capsys, tmp_path, argv, fragment)


# --- what an earlier result allows ------------------------------------------------------------

@pytest.fixture(scope="module")
def earlier_fc(tmp_path_factory):
    """A results folder holding a 1-epoch FC result of a sweep of FC and CNN (tiny data)."""
    root = tmp_path_factory.mktemp("earlier")
    data = tiny_h5(root / "tiny.h5")
    text = 'name = "two"\nnetworks = ["fc", "cnn"]\nseeds = 1\n[base]\nepochs = 1\nbatch_size = 8\n'
    (root / "two.toml").write_text(text)
    out = root / "results"
    assert sweep.main([str(root / "two.toml"), "--networks", "fc", "--data", str(data), "--out",
                       str(out), "--no-checkpoints", "--quiet"]) == 0
    return root, out


def test_merge_that_does_not_match_is_refused_before_training(earlier_fc, tmp_path, capsys):
    root, out = earlier_fc
    capsys.readouterr()
    changed = tmp_path / "two.toml"  # the same sweep, but FC's learning rate has since changed
    changed.write_text((root / "two.toml").read_text() + "lr = 0.05\n")
    line = refuse_sweep(capsys, tmp_path, [str(changed), "--networks", "cnn", "--merge",
                                           "--data", str(root / "tiny.h5")],
                        "were not trained with this sweep's settings; cannot merge", out=out)
    assert "fc" in line and (out / "two" / "metrics.h5").is_file()


def test_merge_with_other_data_is_refused_before_training(earlier_fc, tmp_path, capsys):
    root, out = earlier_fc
    capsys.readouterr()
    other = tiny_h5(tmp_path / "other.h5", **{"test/data": np.zeros((6, 256), np.float32),
                                              "test/target": np.arange(6, dtype=np.int32)})
    line = refuse_sweep(capsys, tmp_path, [str(root / "two.toml"), "--networks", "cnn",
                                           "--merge", "--data", str(other)],
                        "tested on 10; this data has 20 and 6, or other test labels: "
                        "cannot merge", out=out)
    assert "trained on 20 images" in line and (out / "two" / "metrics.h5").is_file()


def test_unreadable_earlier_result_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "tiny").mkdir(parents=True)
    (out / "tiny" / "metrics.h5").write_bytes(b"not HDF5")
    (tmp_path / "tiny.toml").write_text(TINY)
    refuse_sweep(capsys, tmp_path, [str(tmp_path / "tiny.toml")],
                 "cannot read the existing result", out=out)


# --- a download that fails its checksum ---------------------------------------------------------

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without logging each request to stderr."""

    def log_message(self, *args):
        pass


def test_failed_checksum_of_a_download(tmp_path, capsys, monkeypatch):
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
        out, checkpoints = tmp_path / "out", tmp_path / "ck"
        assert_refused(capsys, sweep.main, ["lr", "--networks", "fc", "--out", str(out),
                                            "--checkpoints", str(checkpoints)],
                       "checksum mismatch", out, checkpoints)
    finally:
        httpd.shutdown()
        httpd.server_close()
    cache = tmp_path / "cache" / "uspsjax"
    assert not cache.exists() or list(cache.iterdir()) == []


# --- every command: one line for a bad flag -----------------------------------------------------

@pytest.fixture
def commands(tmp_path):
    """(main, argv) per command and case: an unknown flag and a bad value for each."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {
        ("sweep", "unknown"): (sweep.main, ["lr", "--bogus"], "unrecognized arguments: --bogus"),
        ("sweep", "value"): (sweep.main, ["lr", "--seeds", "x"], "--seeds: expected a positive"),
        ("bench", "unknown"): (bench.main, ["--bogus"], "unrecognized arguments: --bogus"),
        ("bench", "value"): (bench.main, ["--batch-sizes", "0"], "--batch-sizes: expected"),
        ("bench", "choice"): (bench.main, ["--dtype", "float16"], "invalid choice: 'float16'"),
        ("bench", "microbatch"): (bench.main, ["--microbatch", "-1"], "--microbatch: expected"),
        ("bench", "block"): (bench.main, ["--quick", "--networks", "cnn", "--batch-sizes", "16",
                                          "--microbatch", "5", "--out", str(tmp_path / "out")],
                             "microbatch = 5 must divide batch_size = 16"),
        ("profile", "unknown"): (profile.main, ["fc", "--bogus"], "unrecognized arguments"),
        ("profile", "value"): (profile.main, ["fc", "--steps", "0"], "--steps: expected a"),
        ("profile", "missing"): (profile.main, [], "required: network"),
        ("profile", "network"): (profile.main, ["rnn"], "invalid choice: 'rnn'"),
        ("report", "unknown"): (report.main, ["--bogus"], "unrecognized arguments: --bogus"),
        ("report", "value"): (report.main, ["--results", str(a_file)], "no such results folder"),
    }


@pytest.mark.parametrize("command, case", [
    ("sweep", "unknown"), ("sweep", "value"), ("bench", "unknown"), ("bench", "value"),
    ("bench", "choice"), ("bench", "microbatch"), ("bench", "block"), ("profile", "unknown"),
    ("profile", "value"), ("profile", "missing"),
    ("profile", "network"), ("report", "unknown"), ("report", "value")])
def test_every_command_refuses_a_bad_flag_in_one_line(commands, tmp_path, capsys, command, case):
    main, argv, fragment = commands[(command, case)]
    assert_refused(capsys, main, argv, fragment, tmp_path / "out")


@pytest.mark.parametrize("argv", [["uspsjax.sweep", "lr", "--epochs", "-1"],
                                  ["uspsjax.report", "--results"]])
def test_bad_input_in_a_real_process(tmp_path, argv):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and argv[-1] in lines[0]
    assert list(tmp_path.iterdir()) == [] and time.perf_counter() - t0 < 120
