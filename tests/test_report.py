"""The report: rebuilt byte for byte from results/, verdicts computed from the data."""

from pathlib import Path

from uspsjax import report, results
from test_results import make_bagging_run, make_run

ROOT = Path(__file__).resolve().parents[1]


def fixture_results(tmp_path):
    out = tmp_path / "results"
    results.write_results(out, make_run())
    results.write_results(out, make_bagging_run())
    return out


def test_report_regenerates_byte_for_byte(tmp_path, capsys):
    out = fixture_results(tmp_path)
    assert report.main(["--results", str(out)]) == 0
    first = (out / "REPORT.md").read_bytes()
    assert report.main(["--results", str(out)]) == 0
    assert (out / "REPORT.md").read_bytes() == first
    text = first.decode()
    assert "Not run yet: `python -m uspsjax.sweep baseline`" in text
    # lr: fc's lr 0.001 members reach 90/92/94 %; lr 50 diverged in all 3 fc seeds.
    assert "| FC | lr=50 | 3 | diverged (3/3) | — |" in text
    assert "| FC | lr=0.001 | 3 | 92.00 ± 2.00 | — |" in text
    assert "- FC: lr=0.001 gives the best accuracy: **holds**" in text
    assert "![lr accuracy](lr/accuracy.png)" in text
    assert "(1 left out here)" in text  # the bagging fixture's diverged member


def test_report_errors_are_one_line(tmp_path, capsys):
    assert report.main(["--results", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_committed_report_matches_committed_results():
    committed = ROOT / "results" / "REPORT.md"
    assert committed.read_text() == report.build_report(ROOT / "results")
