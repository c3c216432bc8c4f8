"""Each setting is declared once (a field of `train.Static` or `train.Hparams`): the README's
table, `--help`, defaults and validation all come from that declaration."""

import re
from pathlib import Path

import pytest

from uspsjax import grid, sweep, train
from uspsjax.errors import InputError

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_table_is_the_schema():
    text = README.read_text()
    table = train.settings_table()
    assert table in text
    assert len(re.findall(r"^\| setting \| kind \|", text, re.M)) == 1


def test_help_shows_the_schema(capsys):
    with pytest.raises(SystemExit):
        sweep.build_parser().parse_args(["--help"])
    assert train.settings_table() in capsys.readouterr().out


def bad_value(spec):
    """A value that the setting's declaration forbids."""
    if spec["choices"]:
        return "no-such-choice"
    if spec["type"] is bool:
        return 3
    if spec["bounds"]:
        lo, hi, lo_ok, hi_ok = spec["bounds"]
        return lo if not lo_ok else (hi if hi != float("inf") and not hi_ok else lo - 1)
    return 5  # init: not a string


@pytest.mark.parametrize("name", sorted(train.settings_schema()))
def test_every_setting_is_validated(name):
    spec = train.settings_schema()[name]
    with pytest.raises(InputError, match=name):
        grid._check_setting("test", name, bad_value(spec), n_train=7291)
    grid._check_setting("test", name, spec["default"], n_train=7291)  # the default is valid


def test_defaults_come_from_the_declaration():
    schema = train.settings_schema()
    assert {k: v["default"] for k, v in schema.items() if v["kind"] == "dynamic"} == \
        train.HPARAM_DEFAULTS
    assert {k for k, v in schema.items() if v["kind"] == "static"} == {
        f for f in train.Static.__dataclass_fields__ if f != "network"}
