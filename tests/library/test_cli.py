"""`talkmosaic library add|list|stats` on a data directory in tmp_path."""

import pytest

from core.cli import main
from tests.library.conftest import photo_bytes


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


def test_library_add_counts_the_files_that_are_not_photos(photo_dir, capsys):
    (photo_dir / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (photo_dir / "notes.txt").write_text("cars")
    assert main(["library", "add", str(photo_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Left out 2 files that are not photos: 1 .svg, 1 .txt" in out
    assert "export it as PNG" in out
    assert "Added 10 photos" in out


def test_library_add_fails_when_every_photo_failed(tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(f"{name} is not a picture at all".encode())
    assert main(["library", "add", str(folder), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "Added 0 photos, 0 already in the library, 2 unreadable" in captured.out
    assert captured.err.strip() == f"error: none of the 2 photos in {folder} could be added."


def test_library_add_of_a_folder_without_photos_fails_with_one_sentence(tmp_path, capsys):
    folder = tmp_path / "drawings"
    folder.mkdir()
    (folder / "fox.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    assert main(["library", "add", str(folder), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "Left out 1 file that is not a photo: 1 .svg" in captured.out
    assert captured.err.startswith(f"error: {folder} holds no photos (looked for .bmp, ")
    assert "Traceback" not in captured.err


def test_library_add_again_adding_nothing_new_still_succeeds(photo_dir, capsys):
    assert main(["library", "add", str(photo_dir), "--no-progress"]) == 0
    assert main(["library", "add", str(photo_dir), "--no-progress"]) == 0


@pytest.fixture
def target(tmp_path, photo_dir):
    main(["library", "add", str(photo_dir), "--no-progress"])
    path = tmp_path / "target.png"
    path.write_bytes(photo_bytes(99, (64, 64)))
    return path


def test_mosaic_build_to_a_missing_folder_fails_before_building(target, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "nowhere" / "x.png"
    code = main(["mosaic", "build", str(target), "--name", "fox", "--cols", "4", "--out", str(out)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"error: cannot write {out}: the folder {out.parent} does not exist.\n"
    )
    assert main(["mosaic", "list"]) == 0
    assert "fox" not in capsys.readouterr().out  # nothing was built for nothing


def test_mosaic_build_whose_render_cannot_be_written_says_the_mosaic_is_saved(
    target, tmp_path, capsys
):
    capsys.readouterr()
    a_folder = tmp_path / "taken.png"
    a_folder.mkdir()  # writing a file there fails after the build
    code = main(["mosaic", "build", str(target), "--name", "fox", "--cols", "4",
                 "--out", str(a_folder)])
    assert code == 1
    captured = capsys.readouterr()
    assert 'Built "fox"' in captured.out
    [line] = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert line.startswith('error: the mosaic "fox" is saved (its render is ')
    assert f"but {a_folder} could not be written: Is a directory." in line
    assert "Traceback" not in captured.err
    assert main(["mosaic", "show", "fox"]) == 0
