"""Progress without a terminal: plain lines on stderr at most every PLAIN_EVERY_S seconds and a last
one, none for a phase shorter than that, none when disabled (before: a build whose stderr went to a
log file printed nothing for its whole run)."""
from __future__ import annotations

import msif_index.progress as P
from msif_index.progress import progress


def _lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""
    return [line for line in captured.err.splitlines() if line]


def test_plain_lines_without_a_terminal(capsys, monkeypatch):
    """A line per advance at least PLAIN_EVERY_S after the last one, then the last count once: not
    again when the last advance has just printed it (two identical 100% lines before)."""
    clock = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(P, "PLAIN_EVERY_S", 5.0)
    for final_shown in (True, False):
        clock[0] = 0.0
        with progress(10, "featurize") as advance:          # pytest's stderr is no terminal
            clock[0] = 10.0
            advance(4)
            clock[0] = 20.0 if final_shown else 12.0
            advance(6)
        lines = _lines(capsys)
        assert len(lines) == 2, lines
        assert lines[0].startswith("featurize: 4/10 ex (40%), ") and "ex/s" in lines[0]
        assert lines[-1].startswith("featurize: 10/10 ex (100%), ")


def test_a_short_phase_or_a_disabled_one_prints_nothing(capsys, monkeypatch):
    monkeypatch.setattr(P, "PLAIN_EVERY_S", 3600.0)
    with progress(5, "statistics", unit="rows") as advance:
        advance(5)
    assert _lines(capsys) == []
    monkeypatch.setattr(P, "PLAIN_EVERY_S", 0.0)
    with progress(5, "statistics", enabled=False) as advance:
        advance(5)
    assert _lines(capsys) == []


def test_a_falsy_enabled_is_silent_on_a_terminal_too(capsys, monkeypatch):
    """``enabled=0`` (a falsy stand-in for False, as a config file or a numpy bool gives) prints no
    bar even where stderr is a terminal (before: only ``False`` itself silenced it)."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    for off in (False, 0):
        with progress(5, "statistics", enabled=off) as advance:
            advance(5)
        assert _lines(capsys) == [], off


def test_the_bar_goes_to_stderr_never_stdout(capsys):
    """stdout carries results (`msif query --json > file`): a bar, shown or forced, writes stderr only
    (before: rich's default console, stdout, put the bar's last frame into redirected JSON)."""
    with progress(3, "featurize", enabled=True) as advance:
        advance(3)
    captured = capsys.readouterr()
    assert captured.out == "" and "featurize" in captured.err


def test_a_resumed_phase_counts_its_loaded_items_in_the_total_not_the_rate(capsys, monkeypatch):
    """A resumed HVP phase showed "31 HVP/s" where 15 were computed per second: the rows loaded from
    the interrupted run counted in the rate."""
    clock = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(P, "PLAIN_EVERY_S", 5.0)
    with progress(992, "hessian", unit="HVP", initial=512) as advance:
        clock[0] = 32.0
        advance(480)
    line = _lines(capsys)[-1]
    assert line.startswith("hessian: 992/992 HVP (100%), 15 HVP/s, 32 s"), line
