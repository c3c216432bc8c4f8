"""Find, fetch, verify and load the USPS digits (16x16 grayscale, flattened to 256 pixels).

The on-disk format is one HDF5 file with `train/data` (N, 256) float32 in [0, 1] and
`train/target` (N,) int32 in 0..9, and the same under `test/`. When no file is given, the
public LIBSVM copies are downloaded once, checked against known md5s and converted to that
layout in the user's cache directory.
"""

import bz2
import hashlib
import http.client
import os
import tempfile
import urllib.request
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import h5py
import numpy as np

from uspsjax.errors import InputError

ENV_VAR = "USPSJAX_DATA"
MIRROR_VAR = "USPSJAX_MIRROR"  # a base URL serving usps.bz2 and usps.t.bz2 instead of LIBSVM's
FILENAME = "usps.h5"
SPLITS = ("train", "test")
N_PIXELS = 256
N_CLASSES = 10
N_TRAIN = 7291  # the published training split (the test split has 2007)
TIMEOUT_S = 60

# md5 rather than sha256 because these are the only published checksums (torchvision's).
SOURCES = MappingProxyType({
    "train": ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.bz2",
              "ec16c51db3855ca6c91edd34d0e9b197"),
    "test": ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/usps.t.bz2",
             "8ea070ee2aca1ac39742fdd1ef5ed118"),
})


class Dataset(NamedTuple):
    """The USPS splits: pixels float32 (N, 256) in [0, 1], labels int32 (N,) in 0..9; a
    validation split only when `split_validation` made one."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None  # held out from the training images (`split_validation`)
    y_val: np.ndarray | None = None


def cache_dir() -> Path:
    """Where a downloaded copy lives: $XDG_CACHE_HOME/uspsjax, else ~/.cache/uspsjax."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "uspsjax"


def locate(path: str | None = None, *, base_url: str | None = None) -> Path:
    """Return the HDF5 file to use: `path`, else $USPSJAX_DATA, else the cache (download if empty,
    from `base_url` or $USPSJAX_MIRROR if set, else the LIBSVM site).

    A given `path` or a set variable that names no file is an error rather than a reason to
    fall through, so a typo never silently trains on some other copy.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"{p}: no such file")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InputError(f"{ENV_VAR}={env}: no such file")
        return p
    cached = cache_dir() / FILENAME
    if cached.is_file():
        return cached
    return download(cache_dir(), base_url or os.environ.get(MIRROR_VAR) or None)


def _fetch(url: str, md5: str) -> bytes:
    # Held in memory, never on disk, so a failed or corrupt download cannot leave a partial file.
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            blob = resp.read()
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise InputError(f"{url}: download failed: {' '.join(str(e).split())}") from None
    got = hashlib.md5(blob).hexdigest()
    if got != md5:
        raise InputError(f"{url}: checksum mismatch: md5 {got}, expected {md5}")
    return blob


def _parse_svmlight(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode bzip2'd svmlight lines `LABEL idx:val ...` (labels 1..10, values in [-1, 1])."""
    try:
        lines = [ln for ln in bz2.decompress(blob).decode("ascii").splitlines() if ln.strip()]
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{where}: not bzip2'd text: {e}") from None
    if not lines:
        raise InputError(f"{where}: no samples")
    # svmlight leaves out zero-valued features, so absent pixels are 0 in [-1, 1] units.
    x = np.zeros((len(lines), N_PIXELS), np.float64)
    y = np.empty(len(lines), np.int32)
    for row, line in enumerate(lines):
        bad = f"{where}: line {row + 1}:"
        parts = line.split()
        if line.count(":") != len(parts) - 1:
            raise InputError(f"{bad} expected 'LABEL idx:val ...'")
        try:
            # Parsing a whole line in one numpy call is ~10x faster than per-token Python.
            nums = np.array(line.replace(":", " ").split(), np.float64)
        except ValueError:
            raise InputError(f"{bad} non-numeric field") from None
        label, idx, val = nums[0], nums[1::2], nums[2::2]
        if not (1 <= label <= N_CLASSES and label == round(label)):  # also rejects nan/inf
            raise InputError(f"{bad} label {parts[0]} is not an integer in 1..{N_CLASSES}")
        if np.any(idx != np.round(idx)) or np.any((idx < 1) | (idx > N_PIXELS)):
            raise InputError(f"{bad} feature index outside 1..{N_PIXELS}")
        if not np.all(np.abs(val) <= 1):
            raise InputError(f"{bad} pixel value outside [-1, 1]")
        x[row, idx.astype(np.int64) - 1] = val
        y[row] = int(label) - 1
    return ((x + 1) / 2).astype(np.float32), y


def download(dest_dir: Path, base_url: str | None = None, sources=None) -> Path:
    """Fetch the LIBSVM USPS files, verify their md5s and write `dest_dir/usps.h5`; return its path.

    `sources` maps split -> (url, md5) and defaults to SOURCES; `base_url` replaces each url's
    directory (for mirrors). Any failure raises InputError and leaves no file in `dest_dir`.
    """
    sources = SOURCES if sources is None else sources
    fetched = {}
    for split in SPLITS:
        url, md5 = sources[split]
        if base_url is not None:
            url = f"{base_url.rstrip('/')}/{url.rsplit('/', 1)[-1]}"
        fetched[split] = (url, _fetch(url, md5))
    arrays = {split: _parse_svmlight(blob, url) for split, (url, blob) in fetched.items()}

    target = Path(dest_dir) / FILENAME
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename: readers never see half a file.
        fd, tmp = tempfile.mkstemp(prefix=".usps-", suffix=".h5.tmp", dir=target.parent)
        os.close(fd)
        with h5py.File(tmp, "w") as f:
            for split, (x, y) in arrays.items():
                f.create_dataset(f"{split}/data", data=x)
                f.create_dataset(f"{split}/target", data=y)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as e:
        raise InputError(f"{target}: cannot write: {' '.join(str(e).split())}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return target


def _read_split(f: h5py.File, split: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for name, ndim in (("data", 2), ("target", 1)):
        key = f"{split}/{name}"
        ds = f.get(key)
        if not isinstance(ds, h5py.Dataset):
            problem = "is missing" if ds is None else "is not a dataset"
            raise InputError(f"{path}: {key} {problem}")
        want = "(N, 256)" if ndim == 2 else "(N,)"
        if ds.ndim != ndim or (ndim == 2 and ds.shape[1] != N_PIXELS):
            raise InputError(f"{path}: {key} has shape {ds.shape}, expected {want}")
        if ds.shape[0] == 0:
            raise InputError(f"{path}: {key} is empty")
        kinds = "f" if name == "data" else "iu"
        if ds.dtype.kind not in kinds:
            kind = "floats" if name == "data" else "integers"
            raise InputError(f"{path}: {key} has dtype {ds.dtype}, expected {kind}")
        out.append(ds[()])
    x, y = out
    if len(x) != len(y):
        raise InputError(
            f"{path}: {split}/target has {len(y)} labels but {split}/data has {len(x)} rows")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{path}: {split}/data has non-finite values")
    if x.min() < 0 or x.max() > 1:
        raise InputError(
            f"{path}: {split}/data has values in [{x.min():g}, {x.max():g}], expected [0, 1]")
    if y.min() < 0 or y.max() >= N_CLASSES:
        raise InputError(
            f"{path}: {split}/target has labels in [{y.min()}, {y.max()}], expected 0..9")
    return x.astype(np.float32), y.astype(np.int32)


def read_h5(path: Path) -> Dataset:
    """Read and validate a USPS HDF5 file; any problem raises InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            (x_train, y_train), (x_test, y_test) = (_read_split(f, s, path) for s in SPLITS)
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        # h5py reports damaged files (e.g. truncated) through several exception types.
        raise InputError(f"{path}: unreadable HDF5: {' '.join(str(e).split())}") from None
    return Dataset(x_train, y_train, x_test, y_test)


def split_validation(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """Hold out `n` training images, drawn with `seed`, as the validation split: the same for
    every member of a sweep, whatever its own seed. The remaining training images keep their
    order. `n = 0` returns the dataset unchanged."""
    if n == 0:
        return dataset
    total = len(dataset.y_train)
    if not 0 < n < total:
        raise InputError(f"validation = {n}: expected 0 <= n < {total} training images")
    held = np.zeros(total, bool)
    held[np.random.default_rng(seed).permutation(total)[:n]] = True
    return dataset._replace(x_train=dataset.x_train[~held], y_train=dataset.y_train[~held],
                            x_val=dataset.x_train[held], y_val=dataset.y_train[held])


def load(path: str | None = None) -> Dataset:
    """Locate (see `locate`) and read the USPS digits."""
    return read_h5(locate(path))


def content_hash(dataset: Dataset) -> str:
    """The SHA-256 of the arrays' values (their dtypes, shapes and bytes, splits in order): what
    a resumed run, a gathered shard and a merge must share. Two files with the same digits hash
    alike however they were written; a single changed pixel or label does not."""
    digest = hashlib.sha256()
    for a in dataset:
        if a is not None:
            a = np.ascontiguousarray(a)
            digest.update(f"{a.dtype.str}{a.shape}".encode())
            digest.update(a.tobytes())
    return digest.hexdigest()
