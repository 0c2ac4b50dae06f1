"""Shared fixtures: an application context on a real SQLite file in tmp_path."""

import glob
import os
from pathlib import Path

import pytest

from core.context import AppContext
from core.settings import Settings

VEHICLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vehicles"

# Debian keeps PostgreSQL's server binaries (initdb, pg_ctl) off PATH, in a versioned folder.
for _bin in sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1:]:
    if _bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + _bin


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=None)


@pytest.fixture
def ctx(settings):
    context = AppContext.open(settings)
    yield context
    context.close()


@pytest.fixture
def vehicle_photos() -> list[Path]:
    """The real car photos beside the project (../shared/data/vehicles)."""
    photos = sorted(VEHICLES.glob("*/*.jpg"))
    if not photos:
        pytest.skip("../shared/data/vehicles is not beside the project")
    return photos
