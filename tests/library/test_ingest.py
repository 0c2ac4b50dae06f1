"""Ingest: dedup, idempotence, resumability, bad files, labels, the feature index."""

import io

import numpy as np
import pytest
from PIL import Image

from core import library
from core.library import LibraryIndex, add_car_photo, ingest_paths, library_stats
from storage import cars as car_rows
from tests.library.conftest import photo_bytes, png_header_only


def count(ctx) -> int:
    with ctx.db.session() as session:
        return car_rows.count_cars(session)


def test_every_new_photo_is_added_once(ctx, photo_dir):
    report = ingest_paths(ctx, photo_dir, progress=False)
    assert (report.added, report.skipped_duplicates, report.failed) == (10, 0, [])
    assert count(ctx) == 10


def test_a_second_run_adds_nothing(ctx, photo_dir):
    ingest_paths(ctx, photo_dir, progress=False)
    again = ingest_paths(ctx, photo_dir, progress=False)
    assert (again.added, again.skipped_duplicates) == (0, 10)
    assert count(ctx) == 10


def test_same_bytes_under_two_names_are_stored_once(ctx, photo_dir):
    (photo_dir / "copy.jpg").write_bytes((photo_dir / "car03.jpg").read_bytes())
    report = ingest_paths(ctx, photo_dir, progress=False)
    assert (report.added, report.skipped_duplicates) == (10, 1)


def test_known_photos_are_skipped_before_decoding(ctx, photo_dir, monkeypatch):
    ingest_paths(ctx, photo_dir, progress=False)
    decoded = []
    monkeypatch.setattr(library, "prepare_photo", lambda *args: decoded.append(args))
    ingest_paths(ctx, photo_dir, progress=False)
    assert decoded == []


def test_an_interrupted_ingest_keeps_finished_batches_and_resumes(ctx, photo_dir, monkeypatch):
    real_add = car_rows.add_cars
    calls = []

    def add_then_interrupt(session, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_add(session, rows)

    monkeypatch.setattr(car_rows, "add_cars", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        ingest_paths(ctx, photo_dir, progress=False, batch_size=4)
    assert count(ctx) == 4

    monkeypatch.setattr(car_rows, "add_cars", real_add)
    resumed = ingest_paths(ctx, photo_dir, progress=False, batch_size=4)
    assert (resumed.added, resumed.skipped_duplicates) == (6, 4)
    assert count(ctx) == 10


def test_unreadable_files_are_reported_and_the_rest_added(ctx, photo_dir):
    good = photo_bytes(99)
    (photo_dir / "random.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (photo_dir / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photo_dir / "notes.png").write_bytes(b"shopping list: tyres, wipers")
    (photo_dir / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    (photo_dir / "readme.txt").write_text("not a photo suffix: ignored, not reported")
    report = ingest_paths(ctx, photo_dir, progress=False)
    reasons = {path.rsplit("/", 1)[-1]: reason for path, reason in report.failed}
    assert report.added == 10
    assert set(reasons) == {"random.jpg", "truncated.jpg", "notes.png", "bomb.png"}
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notes.png"]
    assert "too many pixels" in reasons["bomb.png"]


def test_oversized_files_are_reported_without_being_read(ctx, photo_dir, monkeypatch):
    monkeypatch.setattr(ctx.settings, "max_upload_bytes", 1 << 20)
    (photo_dir / "huge.jpg").write_bytes(photo_bytes(5) + b"\0" * (1 << 20))
    report = ingest_paths(ctx, [photo_dir / "huge.jpg", photo_dir / "missing.jpg"], progress=False)
    assert report.added == 0
    assert [reason for _, reason in report.failed] == ["larger than 1 MiB", "file not found"]


def test_labels_csv_metadata_is_applied_by_file_name(ctx, photo_dir, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "file,make,model,year,fuel,co2_g_km,emission_standard,source,colour\n"
        "car00.jpg,Toyota,Prius,2019,hybrid,78,Euro 6d,test fleet,red\n"
        "car01.jpg,Ford,Focus,twenty,petrol,abc,Euro 5,,\n"
        ",Nobody,Nothing,2000,,,,,\n"
    )
    report = ingest_paths(ctx, photo_dir, labels, progress=False)
    with ctx.db.session() as session:
        by_name = {car.file_name: car for car in car_rows.list_cars(session, limit=100)}
    prius, focus = by_name["car00.jpg"], by_name["car01.jpg"]
    assert (prius.make, prius.model, prius.year, prius.fuel) == ("Toyota", "Prius", 2019, "hybrid")
    assert (prius.co2_g_km, prius.emission_standard, prius.source) == (
        78.0,
        "Euro 6d",
        "test fleet",
    )
    assert (focus.make, focus.year, focus.co2_g_km, focus.emission_standard) == (
        "Ford",
        None,
        None,
        "Euro 5",
    )
    assert by_name["car02.jpg"].make is None
    assert len(report.label_problems) == 3
    assert any("line 3" in p and "year 'twenty'" in p for p in report.label_problems)
    assert any("line 4" in p and "no file name" in p for p in report.label_problems)


def test_labels_with_only_some_columns_still_apply(ctx, photo_dir, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("File,Fuel\ncar04.jpg,electric\n")
    report = ingest_paths(ctx, photo_dir, labels, progress=False)
    assert report.label_problems == []
    assert library_stats(ctx).by_fuel == [(None, 9), ("electric", 1)]


def test_thumbnail_and_features_are_stored(ctx, photo_dir):
    ingest_paths(ctx, photo_dir, progress=False)
    with ctx.db.session() as session:
        car = car_rows.car_by_id(session, 1)
    thumbnail = Image.open(io.BytesIO(car.thumbnail))
    assert thumbnail.format == "JPEG" and thumbnail.size == (library.THUMBNAIL_PX,) * 2
    assert (car.width, car.height) == (80, 60)
    features = np.frombuffer(car.features, np.float32).reshape(
        car.feature_grid, car.feature_grid, 3
    )
    assert (
        np.isfinite(features).all() and 0 <= features[..., 0].min() <= features[..., 0].max() <= 100
    )
    assert ctx.media.read(car.media_key) == (photo_dir / car.file_name).read_bytes()


def test_add_car_photo_returns_the_existing_car_for_known_bytes(ctx):
    first = add_car_photo(ctx, photo_bytes(1), "a.jpg", {"make": "Demo", "year": "2020"})
    again = add_car_photo(ctx, photo_bytes(1), "b.jpg")
    assert again.id == first.id and first.year == 2020
    assert count(ctx) == 1


def test_add_car_photo_rejects_a_non_image(ctx):
    with pytest.raises(library.BadImage):
        add_car_photo(ctx, b"GIF89a but not really", "x.gif")
    assert count(ctx) == 0


def test_library_index_is_the_feature_matrix_and_reloads_after_a_change(ctx, photo_dir):
    ingest_paths(ctx, photo_dir, progress=False)
    index = LibraryIndex.load(ctx)
    assert index.features.shape == (10, index.grid * index.grid * 3)
    assert index.features.dtype == np.float32 and len(index) == 10
    assert LibraryIndex.load(ctx) is index
    add_car_photo(ctx, photo_bytes(42), "new.jpg")
    reloaded = LibraryIndex.load(ctx)
    assert len(reloaded) == 11 and reloaded.car_ids[-1] == 11
    assert set(reloaded.thumbnails(ctx, [1, 11])) == {1, 11}


def test_real_car_photos_are_ingested(ctx, vehicle_photos):
    sample = vehicle_photos[::32][:50]
    report = ingest_paths(ctx, sample, progress=False)
    assert (report.added, report.failed) == (50, [])
    index = LibraryIndex.load(ctx)
    assert index.features.shape == (50, 48) and np.isfinite(index.features).all()
    # Real car photos are mostly white, grey and black, yet not all the same colour.
    assert index.features[:, 0::3].std() > 5


def test_labels_given_later_update_photos_already_added(ctx, photo_dir, tmp_path):
    ingest_paths(ctx, photo_dir, progress=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,make,fuel\ncar02.jpg,Renault,electric\n")
    report = ingest_paths(ctx, photo_dir, labels, progress=False)
    assert (report.added, report.labels_updated) == (0, 1)
    assert library_stats(ctx).by_make == [(None, 9), ("Renault", 1)]
    assert ingest_paths(ctx, photo_dir, labels, progress=False).labels_updated == 0


def test_photos_added_meanwhile_by_another_process_are_counted_as_known(
    ctx, photo_dir, monkeypatch
):
    real_known = car_rows.known_shas
    racing = [True]

    def known_then_raced(session, shas):
        found = real_known(session, shas)
        if racing.pop() if racing else False:
            add_car_photo(ctx, (photo_dir / "car05.jpg").read_bytes(), "car05.jpg")
        return found

    monkeypatch.setattr(car_rows, "known_shas", known_then_raced)
    report = ingest_paths(ctx, photo_dir, progress=False)
    assert (report.added, report.skipped_duplicates) == (9, 1)
    assert count(ctx) == 10


def test_thumbnails_are_found_by_numpy_car_ids(ctx, vehicle_photos):
    ingest_paths(ctx, vehicle_photos[:5], progress=False)
    index = LibraryIndex.load(ctx)
    found = index.thumbnails(ctx, index.car_ids[:3])
    assert sorted(found) == sorted(int(i) for i in index.car_ids[:3])
    assert all(data.startswith(b"\xff\xd8") for data in found.values())
