"""Media stores of every backend for the same tests: a folder in tmp_path, a database on a
throw-away PostgreSQL server, a bucket on moto's S3 server (the protocol stand-in)."""

import itertools
import os
import uuid

import pytest

from storage.media import open_media_store
from tests.storage.servers import (
    fake_aws_credentials,
    moto_s3_server,
    postgres_missing,
    postgres_server,
)

BACKENDS = ["folder", "postgres", "s3"]
_databases = itertools.count()


@pytest.fixture(scope="session")
def pg_server():
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    with postgres_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server) -> str:
    return pg_server.create_database(f"storage_{os.getpid()}_{next(_databases)}")


@pytest.fixture(scope="session")
def s3_endpoint():
    pytest.importorskip("boto3")
    pytest.importorskip("moto")
    fake_aws_credentials(os.environ)
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_url(s3_endpoint) -> str:
    import boto3

    bucket = f"media-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/talkmosaic?endpoint_url={s3_endpoint}"


@pytest.fixture(params=BACKENDS)
def media_url(request, tmp_path) -> str:
    if request.param == "folder":
        return str(tmp_path / "media")
    return request.getfixturevalue("pg_url" if request.param == "postgres" else "s3_url")


@pytest.fixture
def store(media_url, tmp_path):
    media = open_media_store(media_url, tmp_path / "unused")
    yield media
    media.close()
