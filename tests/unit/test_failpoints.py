"""CDC_FAILPOINT kills the process at the n-th time a named point is reached, and only then."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

PROGRAM = ("from cdc import failpoints\n"
           "for i in range(3):\n"
           "    failpoints.reached('sink.applied')\n"
           "    print('passed', i, flush=True)\n")


def run(failpoint: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CDC_FAILPOINT"}
    if failpoint is not None:
        env["CDC_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("failpoint, passed", [("sink.applied", 0), ("sink.applied:2", 1),
                                               ("connector.received,sink.applied:3", 2)])
def test_an_armed_point_kills_the_process_at_its_nth_time(failpoint, passed):
    result = run(failpoint)
    assert result.returncode == -signal.SIGKILL, result
    assert result.stdout.count("passed") == passed, result.stdout
    assert "failpoint sink.applied reached" in result.stderr, result.stderr


@pytest.mark.parametrize("failpoint", [None, "", "connector.received", "sink.applied:4"])
def test_points_not_armed_or_not_reached_often_enough_do_nothing(failpoint):
    result = run(failpoint)
    assert result.returncode == 0 and result.stdout.count("passed") == 3, result
