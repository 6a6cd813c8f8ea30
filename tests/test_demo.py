"""The README's first command: `qmigstream demo` tells the whole story and passes."""

from __future__ import annotations

import os
import shutil

from qmigstream.cli import main


def test_demo_runs_every_step_and_passes(tmp_path, capsys):
    keep = tmp_path / "demo"
    args = ["demo", "--keep", str(keep)]
    if shutil.which("qemu-system-x86_64") is None and not os.environ.get("CI"):
        args.append("--no-qemu")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "re-encoded from the decoded fields: identical" in out
    assert "MAC 52:54:00:12:34:56" in out
    assert out.count("device state and RAM equal the source's") == 2
    assert "devices unchanged: True" in out
    if "--no-qemu" not in args:
        assert "its guest memory (pmemsave) equals the pipeline's RAM" in out
    assert out.rstrip().endswith("demo passed")
    for name in ("pc-7.2.mig", "vfio-qemu-7.2.mig", "vfio-qemu-8.2.mig",
                 "vfio-qemu-8.2.mig.json"):
        assert (keep / name).is_file()
