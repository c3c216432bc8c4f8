"""Tests for uspsjax.data: loading, location order, download + conversion, a valid small file.

Bad data files, each refused in one line by the command line: tests/test_bad_input.py.
"""

import bz2
import functools
import hashlib
import http.server
import threading

import h5py
import numpy as np
import pytest

from uspsjax import data
from uspsjax.errors import InputError

TRAIN_COUNTS = [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
TEST_COUNTS = [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]
FILES = {"train": "usps.bz2", "test": "usps.t.bz2"}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # A proxy from the environment would intercept requests meant for the local test server.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_load_shared(shared_h5):
    ds = data.load(str(shared_h5))
    for x, y, n, counts in ((ds.x_train, ds.y_train, 7291, TRAIN_COUNTS),
                            (ds.x_test, ds.y_test, 2007, TEST_COUNTS)):
        assert x.shape == (n, 256) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
        assert x.min() == 0.0 and x.max() == 1.0
        assert np.bincount(y, minlength=10).tolist() == counts


# --- location order -------------------------------------------------------------------------

def test_locate_order(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit.h5", tmp_path / "env.h5"
    cached = tmp_path / "xdg" / "uspsjax" / "usps.h5"
    cached.parent.mkdir(parents=True)
    for p in (explicit, env, cached):
        p.write_bytes(b"")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(data.ENV_VAR, str(env))
    assert data.cache_dir() == tmp_path / "xdg" / "uspsjax"
    assert data.locate(str(explicit)) == explicit
    assert data.locate() == env
    monkeypatch.delenv(data.ENV_VAR)
    assert data.locate() == cached


def test_cache_dir_default(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / ".cache" / "uspsjax"


def test_locate_missing(tmp_path, monkeypatch):
    missing = tmp_path / "nope.h5"
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "also-nope.h5"))
    with pytest.raises(InputError, match="nope.h5"):
        data.locate(str(missing))
    with pytest.raises(InputError, match=f"{data.ENV_VAR}=.*also-nope.h5"):
        data.locate()


# --- download against a local server --------------------------------------------------------

def _svmlight(x, y):
    """Encode like LIBSVM: labels 1..10, pixels in [-1, 1], zero-valued features left out."""
    lines = []
    for row, label in zip((2.0 * x.astype(np.float64) - 1.0).tolist(), y.tolist()):
        feats = " ".join(f"{j}:{v!r}" for j, v in enumerate(row, 1) if v != 0)
        lines.append(f"{label + 1} {feats}\n")
    return bz2.compress("".join(lines).encode(), 1)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_h5):
    """Serve good/ (valid), corrupt/ (wrong bytes), bad/ (bad content), missing/ (404)."""
    root = tmp_path_factory.mktemp("www")
    ds = data.read_h5(shared_h5)
    blobs = {"train": _svmlight(ds.x_train, ds.y_train), "test": _svmlight(ds.x_test, ds.y_test)}
    for sub in ("good", "corrupt", "bad"):
        (root / sub).mkdir()
    for split, name in FILES.items():
        (root / "good" / name).write_bytes(blobs[split])
        (root / "corrupt" / name).write_bytes(blobs[split][: len(blobs[split]) // 2])
        (root / "bad" / name).write_bytes(bz2.compress(b"11 1:0.5\n"))
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    sources = {split: (f"{url}/good/{name}", hashlib.md5(blobs[split]).hexdigest())
               for split, name in FILES.items()}
    yield url, sources
    httpd.shutdown()
    httpd.server_close()


def test_download_via_locate(server, shared_h5, tmp_path, monkeypatch):
    url, sources = server
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "SOURCES", sources)
    path = data.locate(base_url=f"{url}/good")
    assert path == tmp_path / "uspsjax" / "usps.h5"
    assert sorted(p.name for p in path.parent.iterdir()) == ["usps.h5"]
    got, want = data.read_h5(path), data.read_h5(shared_h5)
    for g, w in zip(got[:4], want[:4]):  # the four splits (no validation split here)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
    # Once cached, no network is needed: a dead mirror must not matter.
    assert data.locate(base_url=f"{url}/missing") == path


@pytest.mark.parametrize("sub, match", [("corrupt", "checksum mismatch"),
                                        ("missing", "download failed.*404"),
                                        ("bad", "label 11")])
def test_download_failure_leaves_nothing(server, tmp_path, sub, match):
    url, sources = server
    if sub == "bad":
        sources = {s: (u, hashlib.md5(bz2.compress(b"11 1:0.5\n")).hexdigest())
                   for s, (u, _) in sources.items()}
    dest = tmp_path / "cache"
    with pytest.raises(InputError, match=match):
        data.download(dest, base_url=f"{url}/{sub}", sources=sources)
    assert not dest.exists() or list(dest.iterdir()) == []


def test_download_unreachable(tmp_path):
    dest = tmp_path / "cache"
    sources = {s: (f"http://127.0.0.1:1/{name}", "0" * 32) for s, name in FILES.items()}
    with pytest.raises(InputError, match="download failed"):
        data.download(dest, sources=sources)
    assert not dest.exists() or list(dest.iterdir()) == []


# --- a small valid file (bad files: tests/test_bad_input.py) --------------------------------

def _write(path, **override):
    """Write a small valid USPS-layout file; override[key] replaces a dataset."""
    rng = np.random.default_rng(0)
    arrays = {"train/data": rng.random((10, 256), np.float32),
              "train/target": np.arange(10, dtype=np.int32),
              "test/data": rng.random((5, 256), np.float32),
              "test/target": np.arange(5, dtype=np.int32)}
    arrays.update(override)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    return path


def test_valid_small_file(tmp_path):
    ds = data.read_h5(_write(tmp_path / "ok.h5", **{"train/target": np.arange(10, dtype=np.uint8),
                                                   "test/data": np.ones((5, 256), np.float64)}))
    assert ds.x_test.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.shape == (10, 256) and ds.y_test.shape == (5,)
