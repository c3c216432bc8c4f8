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
    # The command line's checks, by the same words, before anything is read or written.
    for options, words in (({"epochs": 0}, "--epochs: expected a positive integer"),
                           ({"seeds": "two"}, "--seeds: expected a positive integer"),
                           ({"networks": ["fc", "rnn"]}, "--networks: unknown network 'rnn'"),
                           ({"dtype": "float16"}, "--dtype: 'float16' is not one of"),
                           ({"epoch": 2}, "unknown option 'epoch'")):
        with pytest.raises(InputError, match=words):
            uspsjax.run("lr", out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
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


def test_the_command_line_and_the_api_fill_in_the_same_options():
    """Every flag of `python -m uspsjax.sweep` (but --list) is an `Options` field of the same
    name and default, and an `Options` written back as a command line parses to itself: the
    command line is the API's `Options` spelled as flags."""
    from dataclasses import fields

    from uspsjax import sweep
    parser = sweep.build_parser()
    defaults = vars(parser.parse_args([]))
    assert {k: v for k, v in defaults.items() if k != "list"} == {
        f.name: f.default for f in fields(sweep.Options)}
    asked = sweep.Options(sweep="lr", networks=("fc", "cnn"), epochs=3, resume=True,
                          shard="1/4", out="elsewhere", process_id=0)
    argv = asked.command_line()
    assert argv[:4] == ["python", "-m", "uspsjax.sweep", "lr"]
    assert sweep.Options.of(parser.parse_args(argv[3:])) == asked
