"""The Python API as the README shows it: its example runs as written, in a scratch folder."""

import re
from pathlib import Path

import pytest

import uspsjax
from uspsjax.errors import InputError

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_example_runs(tmp_path, monkeypatch, shared_h5):
    block = re.search(r"```python\n(import uspsjax\n.*?)```", README.read_text(), re.S)[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USPSJAX_DATA", str(shared_h5))
    exec(compile(block, "README.md", "exec"), {})
    assert (tmp_path / "example-results" / "lr" / "metrics.h5").is_file()
    assert {p.name for p in (tmp_path / "example-figures").iterdir()} == {"accuracy.png",
                                                                         "loss.png"}


def test_bad_input_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="no such sweep"):
        uspsjax.run("no-such-sweep", out=tmp_path)
    with pytest.raises(InputError, match="not a readable uspsjax result"):
        uspsjax.load(tmp_path)


def test_a_run_has_a_typed_field_for_every_record_of_metrics_h5(tmp_path):
    """`Run`'s fields are what `results.read_metrics` reads, no more and no fewer, each the
    value it read (so a record added to metrics.h5 without a field fails here)."""
    from dataclasses import fields

    import numpy as np

    from test_results import make_run
    from uspsjax import results
    folder = results.write_results(tmp_path, make_run())
    run, record = uspsjax.load(folder), results.read_metrics(folder / "metrics.h5")
    assert {f.name for f in fields(run)} - {"path", "record"} == set(record)
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(getattr(run, key), value)
        else:
            assert getattr(run, key) == value, key
    assert run.path == folder and run.curves.dtype == np.float32
    assert run.curve("test_acc", network="fc").shape == run.curves[run.members("fc"), :, 0].shape
