"""``qmigstream fsm``: single requests and the full table, against the hand-written tables."""

import json

import pytest

from qmigstream.cli import main
from test_device_fsm import EXPECTED


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("features", list(EXPECTED))
def test_table_json_matches_expected(capsys, features):
    rc, out, _ = run(capsys, "fsm", "--table", "--features", features, "--json")
    assert rc == 0
    got = json.loads(out)
    want = {cur: {new: ("EINVAL" if p is None else p) for new, p in row.items()}
            for cur, row in EXPECTED[features].items()}
    assert got == want
    assert list(got) == ["ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING",
                         "RUNNING_P2P", "PRE_COPY", "PRE_COPY_P2P"]


def test_default_features_are_stop_copy_only(capsys):
    rc, out, _ = run(capsys, "fsm", "--table", "--json")
    assert rc == 0 and json.loads(out)["STOP"]["RUNNING_P2P"] == "EINVAL"


def test_single_path_text_and_json(capsys):
    rc, out, _ = run(capsys, "fsm", "RUNNING", "STOP_COPY", "--features", "p2p,pre_copy")
    assert rc == 0 and out.strip() == "RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY"
    rc, out, _ = run(capsys, "fsm", "pre_copy", "resuming", "--features", "all", "--json")
    assert rc == 0
    assert json.loads(out) == {"from": "PRE_COPY", "to": "RESUMING",
                               "features": ["p2p", "pre_copy"],
                               "path": ["RUNNING", "RUNNING_P2P", "STOP", "RESUMING"]}
    rc, out, _ = run(capsys, "fsm", "STOP", "STOP", "--json")
    assert rc == 0 and json.loads(out)["path"] == []


def test_refused_request_exit_1(capsys):
    rc, out, _ = run(capsys, "fsm", "STOP_COPY", "PRE_COPY", "--features", "pre_copy",
                     "--json")
    assert rc == 1 and json.loads(out)["error"] == "EINVAL"
    rc, out, _ = run(capsys, "fsm", "STOP", "RUNNING_P2P")
    assert rc == 1 and "EINVAL" in out


def test_bad_usage_exit_2(capsys):
    assert run(capsys, "fsm", "STOP", "NOWHERE")[0] == 2
    assert run(capsys, "fsm", "STOP")[0] == 2
    assert run(capsys, "fsm", "STOP", "RUNNING", "--features", "warp")[0] == 2
    assert run(capsys, "fsm", "--table", "STOP")[0] == 2


def test_table_text(capsys):
    rc, out, _ = run(capsys, "fsm", "--table", "--features", "all")
    assert rc == 0
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()[2:]}
    assert rows["SC"][6:] == ["EINVAL", "EINVAL"]
    assert rows["PC"][1] == "R>RP>S"
