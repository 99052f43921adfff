"""Replay every shrunk fuzzing reproducer in tests/fuzz/regressions/*.json.

`status: fixed` cases must not fail any more; `status: open` cases are known bugs (xfail,
strict: when one starts passing, flip its status to fixed)."""
import json
import pathlib

import pytest

from fxopt.fuzz import run_case

CASES = sorted((pathlib.Path(__file__).parent / "regressions").glob("*.json"))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_regression(path):
    data = json.loads(path.read_text())
    if data["status"] == "open":
        pytest.xfail(f"open: {data['found']['signature']}")
    outcome = run_case(data["case"])
    assert not outcome.failed, f"{data['found']['signature']} is back: {outcome.detail[:1000]}"
