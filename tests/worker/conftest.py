"""A job queue on a real SQLite file, a photo to ask about, and a recorder for worker updates."""

import io

import pytest
from PIL import Image

from core.worker import JobQueue
from tests.worker.fakes import Updates


@pytest.fixture
def queue(ctx) -> JobQueue:
    return JobQueue(ctx, max_pending=50, per_user=2)


@pytest.fixture
def photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def updates() -> Updates:
    return Updates()
