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
    """`uspsjax.load` gives the `Run` that `results` wrote, and every record of metrics.h5 is
    one of its fields (so a record added to the file without a field, or a field the file
    drops, fails here; the values' round trip: test_results.test_h5_round_trip)."""
    from dataclasses import fields

    import h5py

    from test_results import make_run
    from uspsjax import results
    written = make_run()
    folder = results.write_results(tmp_path, written)
    run = uspsjax.load(folder)
    assert isinstance(run, results.Run) and run.path == folder
    with h5py.File(folder / "metrics.h5") as h5:
        records = set(h5.attrs) | set(h5)
        assert list(h5["curves"].attrs["metrics"]) == list(written.metrics)
    absent = {k for k in results.OPTIONAL_RECORDS if getattr(written, k) is None}
    # `metrics` is an attribute of `curves`; `path` is where the file was found.
    assert records == {f.name for f in fields(results.Run)} - {"path", "metrics"} - absent
    assert run.curve("test_acc", network="fc").shape == run.curves[run.members("fc"), :, 0].shape
