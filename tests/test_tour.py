"""`examples/tour.py --jobs N`: examples run side by side, their lines come in the
tour's order, and the multi-host example runs alone after the others."""

import threading
import time

import pytest

from .helpers import load_example


tour = load_example("tour")


def test_jobs_run_side_by_side_and_print_in_order(monkeypatch, capsys):
    monkeypatch.setattr(tour, "missing_extras", lambda extras: [])
    scripts = [script for _, script, _ in tour.EXAMPLES]
    running, events, lock = set(), [], threading.Lock()
    overlapped = []

    def fake(script, smoke, stream):
        with lock:
            if running:
                overlapped.append(script)
            if script in tour.ALONE:
                # Nothing else runs beside it, and everything else has finished.
                assert not running, running
                assert {s for s, what in events if what == "end"} == set(
                    scripts
                ) - tour.ALONE
            running.add(script)
        # Later examples finish first, so that order must come from the tour.
        time.sleep(0.01 * (len(scripts) - scripts.index(script)))
        with lock:
            running.discard(script)
            events.append((script, "end"))
        return "ok", 0.0, script

    monkeypatch.setattr(tour, "run_example", fake)
    assert tour.main(["--jobs", "3"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if " ok " in l]
    assert [next(s for s in scripts if f" {s} " in l) for l in lines] == scripts
    assert overlapped  # some examples did run at the same time
    assert not set(overlapped) & tour.ALONE


def test_jobs_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        tour.main(["--jobs", "0"])
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
