"""The demo's hints name `talkmosaic` the way it runs from here: bare when it is on PATH, else
by its path (.venv/bin/talkmosaic after `make setup`, whose bin folder is not on PATH)."""

import sys
from pathlib import Path

from core import demo


def test_off_path_the_hint_is_the_scripts_path(monkeypatch, tmp_path):
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "talkmosaic").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(demo.shutil, "which", lambda _name: None)
    monkeypatch.chdir(tmp_path)
    assert demo.command_name() == str(Path(".venv") / "bin" / "talkmosaic")


def test_on_path_the_hint_is_the_bare_name(monkeypatch):
    monkeypatch.setattr(demo.shutil, "which", lambda name: f"/usr/local/bin/{name}")
    assert demo.command_name() == "talkmosaic"
