"""`talkmosaic library add|list|stats` on a data directory in tmp_path."""

import pytest

from core.cli import main


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("TALKMOSAIC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DATABASE_URL", raising=False)


def test_library_add_reports_added_known_and_unreadable(photo_dir, capsys):
    (photo_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["library", "add", str(photo_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "Added 10 photos, 0 already in the library, 1 unreadable" in out
    assert main(["library", "add", str(photo_dir), "--no-progress"]) == 0
    assert "Added 0 photos, 10 already in the library" in capsys.readouterr().out


def test_library_add_applies_labels_and_stats_count_them(photo_dir, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,make,fuel,year\ncar00.jpg,Volvo,diesel,2014\ncar01.jpg,Volvo,x,1066\n")
    main(["library", "add", str(photo_dir), "--labels", str(labels), "--no-progress"])
    assert "year 1066 is not a plausible model year" in capsys.readouterr().out
    assert main(["library", "stats"]) == 0
    out = capsys.readouterr().out
    assert "Photos: 10" in out
    assert "By make: unknown 8, Volvo 2" in out
    assert "diesel 1" in out and "x 1" in out


def test_library_list_pages_newest_first(photo_dir, capsys):
    main(["library", "add", str(photo_dir), "--no-progress"])
    capsys.readouterr()
    main(["library", "list", "--limit", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["10", "9", "8"]
    main(["library", "list", "--limit", "3", "--page", "2", "--by-id"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[1:]] == ["car03.jpg", "car04.jpg", "car05.jpg"]


def test_library_add_of_a_missing_directory_fails_with_one_line(tmp_path, capsys):
    assert main(["library", "add", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.strip().endswith("does not exist.")
