"""``qmigstream check`` against QEMU 7.2 itself: mutated real captures are loaded with
``-incoming`` and check's verdict must be QEMU's on every case (tools/differential)."""

from __future__ import annotations


import pytest

from conftest import load_tool, requires_qemu




def _differential():
    return load_tool("differential")


#: Cases that must be in the table, with QEMU's verdict (True: loads).
EXPECTED = {
    "original": True, "bad-magic": False, "version-2": False, "version-4": False,
    "machine-name": False, "machine-name-nul": True, "idstr": False, "instance-id": False,
    "version-too-high": False, "version-too-low": False, "version-lower-ok": False,
    "ram-version-5": False, "ram-version-3": False, "section-type": False,
    "section-type-subsection": False, "footer-id": False, "footer-byte": False,
    "ram-block-name": False, "ram-block-length": False, "ram-block-resize": True,
    "ram-block-length-sum": False, "ram-flag-unknown": False, "ram-flag-full": False,
    "ram-hook": False, "ram-offset-beyond": False, "ram-zero-fill": True,
    "ram-page-block": False, "page-byte": True, "equal-field": False,
    "equal-field-int32": False, "le-field-high": False, "le-field-low": True,
    "le-field-negative": False, "cut-header": False, "cut-config": False,
    "cut-ram": False, "cut-device": False, "cut-before-footer": False,
    "cut-before-eof": False, "cut-trailer-header": True, "cut-trailer": True,
    "trailer-removed": True, "trailer-damaged": True, "trailer-type": True,
    "garbage-appended": True, "eof-garbage": False, "pci-config-readonly": False,
    "pci-config-writable": True, "subsection-version-wide": True,
    "subsection-version-too-new": False, "pci-irq-state": False,
    "globalstate-runstate": False,
}
XBZRLE = {"xbzrle-length-overflow": False, "xbzrle-encoding-flag": False,
          "xbzrle-decode-error": False, "original": True}


@pytest.fixture(scope="module")
def rows():
    return _differential().run_all(jobs=2)


@pytest.fixture(scope="module")
def random_rows():
    return _differential().run_all(jobs=2, random_n=25)


@pytest.mark.qemu
@requires_qemu
def test_check_agrees_with_qemu_on_every_case(rows):
    bad = [(r["capture"], r["case"], r["qemu"], r["check"]) for r in rows if not r["agree"]]
    assert not bad
    got = {r["case"]: r["qemu_loads"] for r in rows if r["capture"] == "pc-7.2-paused"}
    assert got == EXPECTED
    got = {r["case"]: r["qemu_loads"] for r in rows if r["capture"] == "pc-7.2-running-xbzrle"}
    assert got == XBZRLE
    assert {r["capture"] for r in rows} == set(_differential().PLAN)
    old = {r["case"]: r["qemu_loads"] for r in rows if r["capture"] == "pc-i440fx-2.2-paused"}
    assert old == {"original": True, "idstr": False, "version-too-high": False,
                   "cut-before-eof": False, "garbage-appended": True}


@pytest.mark.qemu
@requires_qemu
def test_check_quotes_qemus_error(rows):
    """Where QEMU fails, check's message quotes one of QEMU's error lines (the first,
    except where QEMU goes on after a complaint)."""
    for r in rows:
        if r["qemu_loads"] or r["case"] == "bad-magic":
            continue
        lines = [l.replace("qemu-system-x86_64: ", "") for l in r["qemu_lines"]]
        assert any(l in r["check"] for l in lines), (r["capture"], r["case"], lines,
                                                     r["check"])
        if (r["capture"], r["case"]) != ("pc-7.2-postcopy-advised", "resume-then-ping"):
            assert lines[0] in r["check"], (r["capture"], r["case"], lines[0], r["check"])


@pytest.mark.qemu
@requires_qemu
def test_check_agrees_with_qemu_on_random_changes(random_rows):
    """The first 25 seeded random cases of each RANDOM capture (tools/differential
    --random): single bytes set to random values, and cuts."""
    d = _differential()
    assert len(random_rows) == 25 * len(d.RANDOM)
    bad = [(r["capture"], r["what"], r["qemu"], r["check"]) for r in random_rows
           if not r["agree"]]
    assert not bad
    # the sample is not trivial: QEMU refuses some and loads others
    assert 0 < sum(r["qemu_loads"] for r in random_rows) < len(random_rows)


def test_table_goes_under_its_heading(tmp_path):
    d = _differential()
    doc = tmp_path / "reliability.md"
    doc.write_text("# Reliability\n\n## Fuzzing\n\nfuzz text\n")
    rows = [{"capture": "c", "case": "x", "what": "a|b", "qemu_loads": False,
             "qemu": "boom", "check_loads": False, "check": "boom", "agree": True}]
    d.write_doc(d.table(rows), str(doc))
    d.write_doc(d.table(rows), str(doc))         # again: replaced, not added twice
    text = doc.read_text()
    assert text.count(d.HEADING) == 1
    assert text.startswith("# Reliability\n\n## Fuzzing\n\nfuzz text\n")
    assert "**1 of 1 cases agree.**" in text and "a\\|b" in text
    doc.write_text(text + "\n## Later section\n\nkept\n")
    d.write_doc(d.table(rows + rows), str(doc))
    text = doc.read_text()
    assert "**2 of 2 cases agree.**" in text and text.endswith("## Later section\n\nkept\n")
