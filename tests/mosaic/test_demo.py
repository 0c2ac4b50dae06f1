"""`talkmosaic demo` on a fresh data directory, and again."""

import io

from PIL import Image

import core.demo
from core.cli import main
from core.demo import run_demo
from core.mosaic import MosaicOptions


def test_demo_builds_the_panda_and_a_rerun_reuses_it(ctx, monkeypatch):
    monkeypatch.setattr(core.demo, "DEMO_PHOTOS", 60)
    monkeypatch.setattr(core.demo, "DEMO_OPTIONS", MosaicOptions(cols=12, tile_px=16))
    said: list[str] = []
    first = run_demo(ctx, said.append)
    again = run_demo(ctx, said.append)
    assert first.built and not again.built and again.mosaic.id == first.mosaic.id
    assert Image.open(first.render_path).size == (12 * 16, first.mosaic.rows * 16)
    assert first.preview_path.stat().st_size <= ctx.settings.preview_max_bytes
    assert first.sample_path.read_bytes() == first.sample.image_bytes
    assert first.sample.car_info["make"]
    assert any("60 photos added" in line for line in said)
    assert any("0 photos added, 60 already there" in line for line in said)


def test_mosaic_commands_print_what_is_stored(settings, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TALKMOSAIC_DATA_DIR", str(settings.data_dir))
    monkeypatch.setattr(core.demo, "DEMO_PHOTOS", 40)
    monkeypatch.setattr(core.demo, "DEMO_OPTIONS", MosaicOptions(cols=10, tile_px=16))
    assert main(["demo"]) == 0
    out = tmp_path / "render.png"
    assert main(["mosaic", "build", str(core.demo.DEMO_TARGET), "--name", "again", "--cols",
                 "10", "--tile", "8", "--out", str(out)]) == 0
    assert Image.open(io.BytesIO(out.read_bytes())).format == "PNG"
    assert main(["mosaic", "list"]) == 0
    assert main(["mosaic", "tile", "again", "b2"]) == 0
    assert main(["mosaic", "tile", "again", "Z99"]) == 1
    printed = capsys.readouterr()
    assert "again" in printed.out and "demo" in printed.out and "B2:" in printed.out
    assert "error: Z99 is off the grid" in printed.err
