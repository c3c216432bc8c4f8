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
