"""``launch``: a rank that raises comes back as one RankError (rank, one-line message, its
traceback), without the elastic launcher's log of the failure."""

from __future__ import annotations

import logging
import os

import pytest

from ringattn.launch import RankError, _held_logs, launch


def _fail_on_rank_1(x: int) -> int:
    if os.environ["RANK"] == "1":
        raise ValueError("bad input\non rank 1")
    return x


def test_a_rank_that_raises_is_a_rank_error(capfd):
    assert launch(_fail_on_rank_1, 1, 7) == {0: 7}
    with pytest.raises(RankError) as err:
        launch(_fail_on_rank_1, 2, 7)
    e = err.value
    assert e.rank == 1 and e.message == "ValueError: bad input on rank 1"
    assert str(e) == "rank 1 failed: ValueError: bad input on rank 1"
    assert "_fail_on_rank_1" in e.traceback
    printed = capfd.readouterr()
    assert "ChildFailedError" not in printed.err and "Traceback" not in printed.err


def test_held_logs_are_replayed_unless_cleared(caplog):
    log = logging.getLogger("ringattn_test_launcher")
    with caplog.at_level(logging.INFO, logger="ringattn_test_launcher"):
        with _held_logs(("ringattn_test_launcher",)):
            log.warning("kept")
            assert caplog.messages == []  # held back while inside
        assert caplog.messages == ["kept"]
        with _held_logs(("ringattn_test_launcher",)) as held:
            log.warning("dropped")
            held.clear()
        assert caplog.messages == ["kept"]
    assert log.propagate and not log.handlers
