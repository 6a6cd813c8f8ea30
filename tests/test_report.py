"""``qmigstream report``: the HTML page for every committed capture, its numbers, its
escaping of names from the stream, its well-formedness, and that Chromium renders it."""

from __future__ import annotations

import contextlib
import hashlib
import html.parser
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib

import pytest

from qmigstream.cli import main
from qmigstream.codec.build import StreamBuilder
from qmigstream.codec.ram_records import RamEos
from qmigstream.codec.records import OpaquePayload
from qmigstream.report import collect, render_html
from qmigstream.wire.header import SectionType as T

from conftest import ROOT, capture_names
from test_vfio_sections import DEV, DEV2, build_stream, state

PS = 4096


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- reading the page back -------------------------------------------------------

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


class PageParser(html.parser.HTMLParser):
    """Checks nesting (every element closed, in order) and keeps what the tests look at."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors = [], []
        self.tables = []          # [(class, [[cell text]])]
        self.titles = []          # text of SVG <title>s
        self.text = []
        self.tags = []
        self._cell = None
        self._title = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in VOID:
            return
        self.stack.append(tag)
        if tag == "table":
            self.tables.append((dict(attrs).get("class", ""), []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "title" and "svg" in self.stack:
            self._title = []

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "title" and self._title is not None:
            self.titles.append("".join(self._title))
            self._title = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._title is not None:
            self._title.append(data)


def parse_page(page):
    p = PageParser()
    p.feed(page)
    p.close()
    assert not p.errors, p.errors[:5]
    assert p.stack == [], f"unclosed: {p.stack}"
    return p


def svgs(page):
    found = re.findall(r"<svg\b.*?</svg>", page, re.S)
    trees = [ET.fromstring(s) for s in found]          # raises on a malformed SVG
    assert len(trees) == page.count("<svg")
    return trees


def self_contained(page):
    """No scripts, no external resources: the only URL is the SVG namespace.

    Looks at the elements and attributes (escaped text from the stream may say
    anything)."""
    assert "<script" not in page.lower()         # text from the stream has its < escaped
    p = parse_page(page)
    banned = {"script", "link", "iframe", "object", "embed", "img", "image", "use",
              "foreignobject", "base", "audio", "video", "source"}
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    for tag, attrs in p.tags:
        assert tag.lower() not in banned, tag
        for k, v in attrs.items():
            assert k.lower() not in ("src", "href", "xlink:href", "action") and \
                not k.lower().startswith("on"), (tag, k)
            if k == "style":
                styles.append(v)
            if k == "xmlns":
                assert v == "http://www.w3.org/2000/svg"
            elif v and k != "content":
                assert "://" not in v and "javascript:" not in v.lower(), (tag, k, v)
    for css in styles:
        assert "url(" not in css and "@import" not in css and "://" not in css


def table(p, cls):
    rows = next(rows for c, rows in p.tables if c == cls)
    head, body = rows[0], rows[1:]
    return [dict(zip(head, r)) for r in body]


# --- every committed capture -----------------------------------------------------

@pytest.fixture(scope="module")
def reports(capture_dir, tmp_path_factory):
    """name -> (page, report JSON, info JSON); each capture read once by each command."""
    out = {}
    d = tmp_path_factory.mktemp("reports")
    for name in capture_names():
        path = capture_dir / f"{name}.mig"
        html_path = d / f"{name}.html"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["report", str(path), "-o", str(html_path), "--json"]) == 0
        rep = json.loads(buf.getvalue())
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["info", str(path), "--json"]) == 0
        info = json.loads(buf.getvalue())
        out[name] = (html_path.read_text(encoding="utf-8"), rep, info, path)
    return out


@pytest.mark.parametrize("name", capture_names())
def test_page_for_every_capture(name, reports):
    page, rep, info, path = reports[name]
    data = path.read_bytes()
    meta = json.loads((ROOT / "fixtures" / "captures" / f"{name}.json").read_text())
    # header: name, size, sha256 (the file's, and the one the capture's metadata records)
    sha = hashlib.sha256(data).hexdigest()
    assert rep["sha256"] == sha == meta["stream"]["sha256"]
    assert rep["size"] == len(data) == info["size"]
    p = parse_page(page)
    text = " ".join(p.text)
    assert sha in text and f"{len(data):,} bytes" in text and f"{name}.mig" in text
    if info["machine"]:
        assert info["machine"] in text
    assert info["qemu_version_hints"]["min"] in text
    for e in info["qemu_version_hints"]["evidence"]:
        assert e in text
    # phases cover the file exactly
    assert sum(rep["phases"].values()) == len(data)
    assert [k for k in rep["phases"] if not k.startswith("iteration")][0] == "header"
    # section byte counts are info's, and so are the page's
    assert {s["section_id"]: s["bytes"] for s in rep["sections"]} == \
        {s["section_id"]: s["bytes"] for s in info["sections"]}
    devices = table(p, "devices")
    for s in info["sections"]:
        if s["idstr"] == "ram":
            assert any(t.startswith(f"ram (section {s['section_id']}, ") and
                       f": {s['bytes']:,} bytes;" in t for t in p.titles)
            continue
        # (idstr, instance) is not unique: two -netdev user give two "slirp" 0 sections
        row = [r for r in devices if r["section"] == str(s["section_id"])]
        assert [(r["idstr"], r["instance"]) for r in row] == [(s["idstr"], str(s["instance_id"]))]
        assert len(row) == 1, s
        assert row[0]["bytes"] == f"{s['bytes']:,}"
        assert row[0]["version"] == str(s["version_id"])
    assert len(devices) == sum(1 for s in info["sections"] if s["idstr"] != "ram")
    # RAM records per kind add up to info's page counts; per block to its per-block counts
    ram = rep["ram"]
    for kind, n in info["ram"]["pages"].items():
        assert sum(d.get(kind, 0) for d in ram["records_per_phase"].values()) == n, kind
    assert ram["pages_per_block"] == {b: sum(c.values())
                                      for b, c in info["ram"]["pages_per_block"].items()}
    assert sum(sum(d.values()) for d in ram["bytes_per_phase"].values()) == \
        sum(info["ram"]["wire_bytes"].values())
    # the RAM PART sections are one per iteration when RAM is the only iterative section
    iterative = [s for s in info["sections"] if set(s["headers"]) & {"START", "PART", "END"}]
    if [s["idstr"] for s in iterative] == ["ram"]:
        assert rep["iterations"] == info["ram"]["sections"].get("PART", 0)
    # every SVG is well-formed XML and the page needs nothing from outside
    trees = svgs(page)
    assert len(trees) >= 3
    self_contained(page)


def test_decoded_and_opaque_devices(reports):
    page, rep, info, _ = reports["pc-7.2-devices"]
    rows = table(parse_page(page), "devices")
    cpu = next(r for r in rows if r["idstr"] == "cpu")
    secs = {s["idstr"]: s for s in rep["sections"]}
    assert int(cpu["fields"].replace(",", "")) == secs["cpu"]["fields"] > 100
    assert cpu["decoded"].startswith("fields field by field (")
    # a 2.2 stream has no trailer: every device section stays opaque and says why
    page, rep, info, _ = reports["pc-i440fx-2.2-devices"]
    rows = table(parse_page(page), "devices")
    apic = next(r for r in rows if r["idstr"] == "apic")
    assert apic["fields"] == "–"
    assert "opaque: the stream has no VMDESCRIPTION trailer" in apic["decoded"]


def test_running_guest_iterations_and_xbzrle(reports):
    page, rep, info, path = reports["pc-7.2-running-xbzrle"]
    assert rep["iterations"] == info["ram"]["sections"]["PART"] > 10
    per = rep["ram"]["records_per_phase"]
    assert len([p for p in per if p.startswith("iteration ")]) == len(per) - 1   # + completion
    xbzrle = info["ram"]["pages"]["xbzrle"]
    assert sum(d["xbzrle"] for d in per.values()) == xbzrle > 0
    assert f"{xbzrle:,} records" in page            # the legend
    p = parse_page(page)
    # one tooltip per (phase, kind) bar, with the records and bytes of that bar
    bars = [t for t in p.titles if " · XBZRLE delta: " in t]
    assert len(bars) == sum(1 for d in per.values() if d["xbzrle"])
    some = next(k for k, d in per.items() if d["xbzrle"])
    n, b = per[some]["xbzrle"], rep["ram"]["bytes_per_phase"][some]["xbzrle"]
    from qmigstream.report import human
    assert any(t.startswith(f"{some} · XBZRLE delta: {n:,} records, {human(b)} on the wire")
               for t in bars)
    # the bytes of the iterations are those of the RAM PART sections (header to footer)
    from qmigstream.codec.reader import read_records
    from qmigstream.codec.records import SectionFooter, SectionHeader
    part, inside = 0, False
    for r in read_records(path):
        if isinstance(r, SectionHeader):
            inside = r.type_name == "PART"
        if inside:
            part += r.size
        if isinstance(r, SectionFooter):
            inside = False
    assert sum(n for k, n in rep["phases"].items() if k.startswith("iteration")) == part


def test_many_rounds_are_grouped():
    """5,000 rounds of PART sections: at most 128 groups, the bytes still exact."""
    b = StreamBuilder()
    b.header()
    b.configuration("pc-i440fx-7.2")
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 64 * PS)]),
              version_id=4, section_id=2)
    for i in range(5000):
        recs = [b.ram_page_record("pc.ram", (i % 64) * PS, zero=True)]
        if i % 1000 == 0:
            recs.append(b.ram_page_record("pc.ram", 0, bytes([i % 251]) * PS))
        b.section(T.SECTION_PART, "ram", recs + [RamEos()], section_id=2)
    b.section(T.SECTION_END, "ram", [RamEos()], section_id=2)
    b.eof()
    data = b.encode()
    rep = collect(io.BytesIO(data))
    d = rep.to_json()
    assert d["iterations"] == 5000 and d["iterations_per_phase"] == 64
    groups = rep.iteration_phases()
    assert len(groups) == -(-5000 // 64) == 79
    assert groups[0] == "iterations 1–64" and groups[-1] == "iterations 4993–5000"
    assert sum(d["phases"].values()) == len(data) == d["size"]
    per = d["ram"]["records_per_phase"]
    assert sum(x["zero"] for x in per.values()) == 5000
    assert per["iterations 1–64"]["normal"] == 1 and per["iterations 4993–5000"]["zero"] == 8
    assert [k for k, x in per.items() if x["normal"]] == \
        [f"iterations {64 * (n // 64) + 1}–{64 * (n // 64) + 64}" for n in range(0, 5000, 1000)]
    page = render_html(rep)
    p = parse_page(page)
    assert "iterations 4993–5000" in " ".join(p.text)
    svgs(page)


# --- names from the stream are text --------------------------------------------

HOSTILE_DEV = '</title></svg><script>alert("dev")</script>\x01'
HOSTILE_BLOCK = "<img src=x onerror=alert(1)>&amp;"
HOSTILE_MACHINE = 'pc-"><script>alert(2)</script>-7.2'


def hostile_stream():
    b = StreamBuilder()
    b.header()
    b.configuration(HOSTILE_MACHINE)
    b.section(T.SECTION_START, "ram", b.ram_setup_records([(HOSTILE_BLOCK, 4 * PS)]),
              version_id=4)
    b.section(T.SECTION_PART, "ram", [b.ram_page_record(HOSTILE_BLOCK, 0, b"\x11" * PS),
                                      b.ram_page_record(HOSTILE_BLOCK, PS, zero=True),
                                      RamEos()])
    b.section(T.SECTION_END, "ram", [RamEos()])
    b.section(T.SECTION_FULL, HOSTILE_DEV, [OpaquePayload(b"\x00" * 16)], version_id=7)
    b.section(T.SECTION_FULL, "<b>ok</b>", [OpaquePayload(b"\x01" * 4)])
    b.eof()
    b.vmdescription(json.dumps({"page_size": PS, "devices": [
        {"name": HOSTILE_DEV, "instance_id": 0, "vmsd_name": "<i>vmsd</i>", "version": 7,
         "fields": [{"name": "<u>f</u>", "type": "uint32", "size": 4, "array_len": 3},
                    {"name": "g", "type": "uint32", "size": 4}]},
        {"name": "<b>ok</b>", "instance_id": 0, "size": 4,
         "fields": [{"name": "data", "type": "buffer", "size": 4}]}]}).encode())
    return b.encode()


def test_hostile_names_are_escaped(tmp_path, capsys):
    path = tmp_path / "<script>.mig"
    path.write_bytes(hostile_stream())
    out = tmp_path / "r.html"
    code, _, err = run_cli(capsys, "report", path, "-o", out)
    assert code == 0, err
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert "<img" not in page and "<b>ok" not in page and "<i>vmsd" not in page
    assert "&lt;script&gt;alert(&quot;dev&quot;)&lt;/script&gt;\\x01" in page
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;amp;" in page
    assert "pc-&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;-7.2" in page
    assert "&lt;script&gt;.mig" in page                  # the file name too
    p = parse_page(page)
    text = " ".join(p.text)
    # the parsed text is the names themselves (control character shown as \x01)
    assert HOSTILE_DEV.replace("\x01", "\\x01") in text
    assert HOSTILE_BLOCK in text and HOSTILE_MACHINE in text
    rows = table(p, "devices")
    dev = next(r for r in rows if r["idstr"].startswith("</title>"))
    assert dev["fields"] == "2" and "vmsd <i>vmsd</i>" in dev["decoded"]
    assert dev["bytes"] == f"{1 + 4 + 1 + len(HOSTILE_DEV) + 8 + 16 + 5:,}"
    for tree in svgs(page):
        for el in tree.iter():
            assert not el.tag.endswith("script") and not el.tag.endswith("foreignObject")
    self_contained(page)


def test_escape_of_every_control_character():
    from qmigstream.report import esc
    s = "".join(chr(c) for c in range(0x20)) + "\x7f\x85\u2028<>&\"'"
    e = esc(s)
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", e)
    assert e.endswith("\u2028&lt;&gt;&amp;&quot;&#x27;") and "\\x00" in e and "\\x85" in e
    ET.fromstring(f"<t a=\"{e}\">{e}</t>")


# --- VFIO ----------------------------------------------------------------------------

def test_vfio_chunks_per_phase(tmp_path, capsys):
    b, _ = build_stream("8.1-9.x", [(DEV, 40, [b"a" * 100, None], [b"b" * 30, b"c" * 7],
                                     state(msix=4)),
                                    (DEV2, 41, [b"d" * 5000], [b"e" * 3], state())],
                        switchover_ack=True)
    path = tmp_path / "v.mig"
    path.write_bytes(b.encode())
    out = tmp_path / "v.html"
    code, stdout, err = run_cli(capsys, "report", path, "-o", out, "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    v = {d["idstr"]: d for d in rep["vfio"]}
    assert v[DEV]["phases"] == {
        "iteration 1": {"chunks": 1, "bytes": 100, "min": 100, "max": 100},
        "completion": {"chunks": 2, "bytes": 37, "min": 7, "max": 30}}
    assert v[DEV2]["phases"] == {
        "iteration 1": {"chunks": 1, "bytes": 5000, "min": 5000, "max": 5000},
        "completion": {"chunks": 1, "bytes": 3, "min": 3, "max": 3}}
    assert v[DEV]["family"] == "8.1-9.x" and v[DEV]["data_bytes"] == 137
    page = out.read_text(encoding="utf-8")
    p = parse_page(page)
    rows = next(rows for c, rows in p.tables if rows and rows[0][:3] == ["device", "family",
                                                                             "phase"])
    assert [DEV, "8.1-9.x", "completion", "2", "37", "7", "30"] in rows
    assert [DEV2, "8.1-9.x", "iteration 1", "1", "5,000", "5,000", "5,000"] in rows
    assert f"completion · {DEV}: 37 bytes in 2 chunks (7–30 bytes each)" in p.titles
    svgs(page)


def test_vfio_5_2_zero_chunks():
    b, _ = build_stream("5.2", [(DEV, 40, [b"p" * 100, None], [b"s" * 50], state(msix=4))],
                        zero_terminator=True, qjson=True)
    rep = collect(io.BytesIO(b.encode()), name="x")
    v = rep.vfio[(DEV, 0)]
    assert v.family.family == "5.2"
    assert dict(v.phases) == {"iteration 1": [1, 100, 100, 100], "iteration 2": [1, 0, 0, 0],
                              "completion": [2, 50, 0, 50]}
    p = parse_page(render_html(rep))
    assert f"iteration 2 · {DEV}: 0 bytes in 1 chunk" in p.titles      # the zero-length mark
    assert f"completion · {DEV}: 50 bytes in 2 chunks (0–50 bytes each)" in p.titles


# --- cut streams, pipes ---------------------------------------------------------

def test_cut_stream_still_gives_a_report(capture, tmp_path, capsys):
    path, _ = capture("pc-7.2-running-xbzrle")
    data = path.read_bytes()
    cut = tmp_path / "cut.mig"
    cut.write_bytes(data[:len(data) // 2])
    out = tmp_path / "cut.html"
    code, stdout, err = run_cli(capsys, "report", cut, "-o", out, "--json")
    assert code == 2
    assert err.startswith("qmigstream report: error: ") and "stream ends inside" in err
    rep = json.loads(stdout)
    assert rep["sha256"] == hashlib.sha256(data[:len(data) // 2]).hexdigest()
    assert sum(rep["phases"].values()) == len(data) // 2 and rep["phases"]["unread"] > 0
    page = out.read_text(encoding="utf-8")
    assert "The stream could not be read to the end." in page
    parse_page(page)
    svgs(page)


def test_not_a_stream(tmp_path, capsys):
    bad = tmp_path / "bad.mig"
    bad.write_bytes(b"hello world")
    code, _, err = run_cli(capsys, "report", bad, "-o", tmp_path / "bad.html")
    assert code == 2 and "bad magic" in err
    assert not (tmp_path / "bad.html").exists()
    code, _, err = run_cli(capsys, "report", bad, "-o", tmp_path / "no" / "such" / "dir.html")
    assert code == 2 and "dir.html" in err


def test_page_on_stdout(capture, capsys):
    path, meta = capture("pc-7.2-paused")
    code, out, err = run_cli(capsys, "report", path, "-o", "-")
    assert code == 0, err
    assert out.startswith("<!DOCTYPE html>") and meta["stream"]["sha256"] in out
    parse_page(out)
    code, out, err = run_cli(capsys, "report", path, "-o", "-", "--json")
    assert code == 2 and "both want stdout" in err


def test_from_a_pipe(capture, tmp_path):
    path, meta = capture("pc-7.2-paused")
    out = tmp_path / "p.html"
    with open(path, "rb") as f:
        r = subprocess.run([sys.executable, "-m", "qmigstream", "report", "-", "-o", str(out),
                            "--json"], stdin=f, capture_output=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["sha256"] == meta["stream"]["sha256"] and rep["name"] == "<stdin>"
    assert "&lt;stdin&gt;" in out.read_text(encoding="utf-8")


def test_bounded_iteration_groups_with_vfio():
    """300 rounds: 128 groups of 1 become groups of 4; RAM and VFIO numbers survive it."""
    b = StreamBuilder()
    b.header()
    b.configuration("pc-i440fx-7.2")
    b.section(T.SECTION_START, "ram", b.ram_setup_records([("pc.ram", 16 * PS)]),
              version_id=4, section_id=2)
    from qmigstream.vfio.builder import plan
    pl = plan("8.1-9.x", DEV, precopy=[bytes([i % 256]) * (i + 1) for i in range(300)],
              stop_copy=[b"z" * 9], config=state())
    b.section(T.SECTION_START, DEV, pl.start, section_id=40)
    for i in range(300):
        b.section(T.SECTION_PART, "ram", [b.ram_page_record("pc.ram", (i % 16) * PS,
                                                            bytes([i % 256]) * PS), RamEos()],
                  section_id=2)
        b.section(T.SECTION_PART, DEV, pl.parts[i], section_id=40)
    b.section(T.SECTION_END, "ram", [RamEos()], section_id=2)
    b.section(T.SECTION_END, DEV, pl.end, section_id=40)
    b.section(T.SECTION_FULL, DEV, pl.full, section_id=40)
    b.eof()
    b.vmdescription(json.dumps({"page_size": PS, "devices": [pl.vmdesc_entry()]}).encode())
    rep = collect(io.BytesIO(b.encode()))
    assert rep.iterations == 300 and rep.iteration_width == 4
    its = rep.iteration_phases()
    assert len(its) == 75 and its[0] == "iterations 1–4" and its[-1] == "iterations 297–300"
    assert sum(d["normal"][0] for d in rep.ram.values()) == 300
    assert all(rep.ram[p]["normal"][0] == 4 for p in its)
    v = rep.vfio[(DEV, 0)]
    assert v.phases["iterations 1–4"] == [4, 1 + 2 + 3 + 4, 1, 4]
    assert v.phases["iterations 297–300"] == [4, 297 + 298 + 299 + 300, 297, 300]
    assert v.data_bytes == 300 * 301 // 2 + 9
    page = render_html(rep)
    parse_page(page)
    svgs(page)


# --- Chromium renders it ------------------------------------------------------------

def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


requires_chromium = pytest.mark.skipif(not chromium() and not os.environ.get("CI"),
                                       reason="chromium not installed")


def png_pixels(data, max_rows=None):
    """(width, height, rows of RGB(A) bytes) of an 8-bit PNG, with the standard library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        n, typ = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(typ + body) == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        pos += 12 + n
        if typ == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif typ == b"IDAT":
            idat.append(body)
        elif typ == b"IEND":
            break
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    assert len(raw) == h * (stride + 1)
    rows, prev = [], bytearray(stride)
    for y in range(min(h, max_rows or h)):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for x in range(bpp, stride):
                line[x] = (line[x] + line[x - bpp]) & 255
        elif f == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif f == 3:
            for x in range(stride):
                line[x] = (line[x] + ((line[x - bpp] if x >= bpp else 0) + prev[x]) // 2) & 255
        elif f == 4:
            for x in range(stride):
                a = line[x - bpp] if x >= bpp else 0
                b, c = prev[x], prev[x - bpp] if x >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


def screenshot(page_path, png, tmp_path):
    exe = chromium()
    assert exe, "chromium is not installed (CI must install it: .ci/run)"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           f"--screenshot={png}", "--window-size=1280,2000", page_path.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, timeout=180)
    assert png.exists(), r.stderr.decode(errors="replace")[-2000:]
    return png.read_bytes()


@pytest.mark.slow
@requires_chromium
def test_chromium_renders_the_page(capture, tmp_path, capsys):
    path, _ = capture("pc-7.2-running-xbzrle")
    out = tmp_path / "report.html"
    assert run_cli(capsys, "report", path, "-o", out)[0] == 0
    data = screenshot(out, tmp_path / "shot.png", tmp_path)
    assert len(data) > 40_000                     # a blank 1280x2000 page is a few KiB
    w, h, bpp, rows = png_pixels(data, max_rows=1100)
    assert (w, h) == (1280, 2000)
    colours = set()
    for row in rows[::3]:
        for x in range(0, w * bpp, bpp * 3):
            colours.add(row[x:x + 3])
    assert len(colours) > 50, len(colours)

    def widest_run(hexcolour):
        """Most pixels of one colour on one row (legend swatches are 12 px wide)."""
        c = bytes.fromhex(hexcolour)
        return max(sum(1 for x in range(0, w * bpp, bpp) if row[x:x + 3] == c)
                   for row in rows[::2])
    # the phase bar drew: its light-blue iterations and its violet trailer, each far
    # wider than any swatch of the HTML legend
    assert widest_run("56b4e9") > 200
    assert widest_run("8e6bbf") > 60


def test_mapped_ram_pages_are_counted_from_the_bitmaps():
    from qmigstream.codec.build import mapped_ram_fill
    b = StreamBuilder()
    b.header()
    b.configuration("pc-q35-9.0", capabilities=["mapped-ram"])
    recs = b.ram_setup_records([("pc.ram", 8 * PS)], mapped_ram=True)
    for i in (1, 5, 6):
        mapped_ram_fill(recs, "pc.ram", i, bytes([i]) * PS)
    b.section(T.SECTION_START, "ram", recs, version_id=4, section_id=2)
    b.section(T.SECTION_END, "ram", [RamEos()], section_id=2)
    b.eof()
    data = b.encode()
    rep = collect(io.BytesIO(data))
    assert sum(rep.phases.values()) == len(data)
    assert rep.phases["setup"] > 8 * PS and rep.iterations == 0
    page = render_html(rep)
    assert "the blocks' bitmaps mark 3 pages as written (pc.ram: 3)" in \
        " ".join(parse_page(page).text)
    assert "No RAM page records in this stream." in page
    svgs(page)


@pytest.mark.parametrize("profile,extra", [
    ("qemu-7.2", ["--xbzrle"]),
    ("qemu-10.0", ["--switchover-ack"]),
])
def test_phases_agree_with_the_writer(capture, tmp_path, capsys, profile, extra):
    """Streams written by `qmigstream migrate`, which counts its own bytes per phase as it
    writes them: the report finds the same phases, rounds, pages and VFIO data."""
    tpl, _ = capture("pc-7.2-paused")
    mig = tmp_path / "m.mig"
    code, _, err = run_cli(capsys, "migrate", "-o", mig, "--profile", profile, "--template",
                           tpl, "--device", "sized:192K", "--iterations", "4", "--stream-sha256",
                           *extra)
    assert code == 0, err
    manifest = json.loads(mig.with_name("m.mig.json").read_text())
    code, stdout, err = run_cli(capsys, "report", mig, "-o", tmp_path / "m.html", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["phases"] == manifest["phases"]
    assert rep["iterations"] == manifest["rounds"] == 4
    assert rep["sha256"] == manifest["sha256"] and rep["size"] == manifest["size"]
    per = rep["ram"]["records_per_phase"]
    for kind in ("zero", "normal", "xbzrle"):
        assert sum(d[kind] for d in per.values()) == manifest["pages"][kind], kind
    (dev,) = manifest["devices"]
    (v,) = rep["vfio"]
    assert (v["idstr"], v["data_bytes"], v["chunks"]) == (dev["idstr"], dev["data_bytes"],
                                                           dev["chunks"])
    page = (tmp_path / "m.html").read_text(encoding="utf-8")
    parse_page(page)
    svgs(page)


def test_vfio_sections_kept_for_family_inference_stay_few():
    """Family inference sees one PART of each shape, and decides as on the whole list."""
    from qmigstream.vfio.scan import scan
    for fam, pre in (("6.0-7.2", [b"p" * 10] * 40 + [None] + [b"q" * 3] * 40),
                     ("8.1-9.x", [b"p" * 10] * 80)):
        b, _ = build_stream(fam, [(DEV, 40, pre, [b"s" * 5], state())])
        data = b.encode()
        rep = collect(io.BytesIO(data))
        v = rep.vfio[(DEV, 0)]
        full, _ = scan(data)
        assert (v.family.family, v.family.candidates, v.family.reason) == \
            (full[(DEV, 0)].family.family, full[(DEV, 0)].family.candidates,
             full[(DEV, 0)].family.reason)
        assert len(v._shapes) <= 2 and rep.iterations == len(pre)
