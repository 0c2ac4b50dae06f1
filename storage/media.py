"""Content-addressed media store: objects named by the sha256 of their bytes, written atomically,
in a local folder (default), in PostgreSQL, or in S3-compatible object storage (`MEDIA_URL`).

Keys are validated hex digests, so no path or object name is ever built from user input.
Every backend streams: `put_chunks` and `chunks` never hold a whole object in memory.
"""

import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    String,
    Table,
    create_engine,
    delete,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

_KEY = re.compile(r"^[0-9a-f]{64}$")
CHUNK_BYTES = 1024 * 1024
# Where a half-written local file waits before its rename; a crashed writer leaves it here.
INCOMING = ".incoming"


class MediaMissing(LookupError):
    """The media store has no file for this key (deleted or never stored)."""


class BadMediaUrl(ValueError):
    """MEDIA_URL names no backend this store knows."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError("media keys are sha256 hex digests")
    return key


def _pieces(chunks: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The same bytes in pieces of exactly `size` (the last may be shorter)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        whole = len(buffer) // size * size
        if whole:
            with memoryview(buffer) as view:
                for start in range(0, whole, size):
                    yield bytes(view[start:start + size])
            del buffer[:whole]
    if buffer:
        yield bytes(buffer)


class MediaStore:
    """What every backend offers; `put` and `read` are the whole-bytes forms of the streams."""

    def put(self, data: bytes) -> str:
        """Store bytes once; returns their key. Writing the same bytes again is a no-op."""
        key = sha256_hex(data)
        if self.has(key):
            return key
        return self.put_chunks([data])

    def put_chunks(self, chunks: Iterable[bytes]) -> str:
        """Store a stream of bytes; the object appears whole, under its sha256, or not at all."""
        raise NotImplementedError

    def read(self, key: str) -> bytes:
        return b"".join(self.chunks(key))

    def chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes in order, a chunk at a time; MediaMissing if there is none."""
        raise NotImplementedError

    def has(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def keys(self, older_than: timedelta = timedelta(0)) -> Iterator[str]:
        """Keys of objects stored at least `older_than` ago (a sweep spares fresh writes)."""
        raise NotImplementedError

    def sweep_incomplete(self, older_than: timedelta, thorough: bool = False) -> int:
        """Removes what crashed writers left behind; returns how many leftovers went.

        Cheap enough for every start; `thorough` also looks where older versions wrote."""
        raise NotImplementedError

    def describe(self, key: str) -> str:
        """Where the object lives, for people (a path, a table row, an object URL)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FolderMediaStore(MediaStore):
    """Files under root/ab/cd/<key>: written to root/.incoming, fsynced, then renamed in place."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / key[2:4] / key

    def put_chunks(self, chunks: Iterable[bytes]) -> str:
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.incoming, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    digest.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            key = digest.hexdigest()
            target = self.path(key)
            if target.exists():
                Path(tmp).unlink()
                return key
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise MediaMissing(key) from None

    def chunks(self, key: str) -> Iterator[bytes]:
        try:
            handle = self.path(key).open("rb")
        except FileNotFoundError:
            raise MediaMissing(key) from None
        return self._read_chunks(handle)

    @staticmethod
    def _read_chunks(handle) -> Iterator[bytes]:
        with handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise MediaMissing(key) from None

    def keys(self, older_than: timedelta = timedelta(0)) -> Iterator[str]:
        cutoff = time.time() - older_than.total_seconds()
        for path in self.root.glob("??/??/*"):
            if _KEY.match(path.name) and path.stat().st_mtime <= cutoff:
                yield path.name

    def sweep_incomplete(self, older_than: timedelta, thorough: bool = False) -> int:
        cutoff = time.time() - older_than.total_seconds()
        leftovers = list(self.incoming.glob(".tmp-*"))
        if thorough:  # writers before .incoming left their temporaries beside the target
            leftovers += self.root.glob("??/??/.tmp-*")
        removed = 0
        for path in leftovers:
            try:
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def describe(self, key: str) -> str:
        return str(self.path(key))


_media = MetaData()
_blob_ids = Sequence("media_blob_ids", metadata=_media)
media_objects = Table(
    "media_objects", _media,
    Column("key", String(64), primary_key=True),
    Column("blob_id", BigInteger, nullable=False, unique=True),
    Column("byte_size", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
media_chunks = Table(
    "media_chunks", _media,
    Column("blob_id", BigInteger, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)
# Any constant shared by every host: serialises the first start's CREATE TABLE.
_SCHEMA_LOCK = 0x7A1C_3E0A


class PostgresMediaStore(MediaStore):
    """Objects in PostgreSQL: a row per object, its bytes in 1 MiB rows of `media_chunks`.

    One transaction writes the chunks and then the object row, so a writer that dies leaves
    nothing anyone can see (PostgreSQL rolls the transaction back), and nothing to sweep.
    """

    def __init__(self, url: str):
        self.engine = create_engine(url, pool_pre_ping=True)
        with self.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
            _media.create_all(conn)

    def put_chunks(self, chunks: Iterable[bytes]) -> str:
        digest, size = hashlib.sha256(), 0
        with self.engine.connect() as conn, conn.begin() as transaction:
            blob_id = conn.execute(_blob_ids.next_value()).scalar_one()
            for seq, piece in enumerate(_pieces(chunks)):
                digest.update(piece)
                size += len(piece)
                conn.execute(media_chunks.insert(), {"blob_id": blob_id, "seq": seq,
                                                     "data": piece})
            key = digest.hexdigest()
            stored = conn.execute(
                pg_insert(media_objects)
                .values(key=key, blob_id=blob_id, byte_size=size)
                .on_conflict_do_nothing()
                .returning(media_objects.c.key)
            ).scalar()
            if stored is None:  # the same bytes were already there: keep theirs, drop ours
                transaction.rollback()
        return key

    def _blob(self, conn, key: str) -> tuple[int, int]:
        """The object's blob id and chunk count (every chunk but the last is CHUNK_BYTES)."""
        row = conn.execute(
            select(media_objects.c.blob_id, media_objects.c.byte_size)
            .where(media_objects.c.key == check_key(key))
        ).first()
        if row is None:
            raise MediaMissing(key)
        return row.blob_id, -(-row.byte_size // CHUNK_BYTES)

    @staticmethod
    def _chunk(conn, blob_id: int, seq: int) -> bytes:
        # psycopg's binary format: bytea arrives as bytes, not hex text to decode (6x faster).
        with conn.connection.driver_connection.cursor(binary=True) as cursor:
            cursor.execute("SELECT data FROM media_chunks WHERE blob_id = %s AND seq = %s",
                           (blob_id, seq))
            return cursor.fetchone()[0]

    def read(self, key: str) -> bytes:
        with self.engine.connect() as conn:
            blob_id, count = self._blob(conn, key)
            return b"".join(self._chunk(conn, blob_id, seq) for seq in range(count))

    def chunks(self, key: str) -> Iterator[bytes]:
        with self.engine.connect() as conn:
            blob_id, count = self._blob(conn, key)
        return self._read_chunks(blob_id, count)

    def _read_chunks(self, blob_id: int, count: int) -> Iterator[bytes]:
        # One chunk per query: memory stays at one chunk whatever the object's size.
        with self.engine.connect() as conn:
            for seq in range(count):
                yield self._chunk(conn, blob_id, seq)

    def has(self, key: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(
                select(media_objects.c.key).where(media_objects.c.key == check_key(key))
            ).scalar() is not None

    def delete(self, key: str) -> None:
        with self.engine.begin() as conn:
            blob_id = conn.execute(
                delete(media_objects).where(media_objects.c.key == check_key(key))
                .returning(media_objects.c.blob_id)
            ).scalar()
            if blob_id is not None:
                conn.execute(delete(media_chunks).where(media_chunks.c.blob_id == blob_id))

    def size(self, key: str) -> int:
        with self.engine.connect() as conn:
            size = conn.execute(select(media_objects.c.byte_size)
                                .where(media_objects.c.key == check_key(key))).scalar()
        if size is None:
            raise MediaMissing(key)
        return size

    def keys(self, older_than: timedelta = timedelta(0)) -> Iterator[str]:
        cutoff = datetime.now(UTC) - older_than
        with self.engine.connect() as conn:
            yield from conn.execute(
                select(media_objects.c.key).where(media_objects.c.created_at <= cutoff)
            ).scalars().all()

    def sweep_incomplete(self, older_than: timedelta, thorough: bool = False) -> int:
        # Rolled-back writes leave no rows; chunks without an object only come from a delete
        # that crashed between its statements, which one transaction rules out. Nothing to do.
        return 0

    def describe(self, key: str) -> str:
        url = self.engine.url
        return f"postgresql://{url.host or 'localhost'}/{url.database} media_objects[{key}]"

    def close(self) -> None:
        self.engine.dispose()


class S3MediaStore(MediaStore):
    """Objects in an S3-compatible bucket, under `prefix/ab/<key>`.

    A write spools to a local temporary file (hashing as it goes, so the key is known before
    the upload), then uploads: S3 shows an object only once its upload completes. A writer
    that dies mid-upload leaves an incomplete multipart upload, which `sweep_incomplete` aborts.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        # Credentials come from boto3's own chain (environment, profile, instance role).
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(s3={"addressing_style": "path"} if endpoint_url else {},
                          retries={"max_attempts": 5, "mode": "standard"}),
        )
        self.transfer = TransferConfig(multipart_threshold=8 * CHUNK_BYTES,
                                       multipart_chunksize=8 * CHUNK_BYTES)

    def name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}{key[:2]}/{key}"

    def put(self, data: bytes) -> str:
        key = sha256_hex(data)
        if not self.has(key):
            self._upload(io.BytesIO(data), key)
        return key

    def put_chunks(self, chunks: Iterable[bytes]) -> str:
        digest = hashlib.sha256()
        with tempfile.SpooledTemporaryFile(max_size=8 * CHUNK_BYTES) as spool:
            for chunk in chunks:
                digest.update(chunk)
                spool.write(chunk)
            key = digest.hexdigest()
            if not self.has(key):
                spool.seek(0)
                self._upload(spool, key)
        return key

    def _upload(self, readable, key: str) -> None:
        # Over 8 MiB boto3 uploads in parts; the object appears once the last part is in.
        self.client.upload_fileobj(readable, self.bucket, self.name(key), Config=self.transfer)

    def _missing(self, error) -> bool:
        return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")

    def chunks(self, key: str) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.name(key))["Body"]
        except ClientError as error:
            if self._missing(error):
                raise MediaMissing(key) from None
            raise
        return self._read_chunks(body)

    @staticmethod
    def _read_chunks(body) -> Iterator[bytes]:
        with body:
            yield from body.iter_chunks(CHUNK_BYTES)

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.name(key))
        except ClientError as error:
            if self._missing(error):
                return None
            raise

    def has(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise MediaMissing(key)
        return head["ContentLength"]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.name(key))

    def keys(self, older_than: timedelta = timedelta(0)) -> Iterator[str]:
        cutoff = datetime.now(UTC) - older_than
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"].rsplit("/", 1)[-1]
                if _KEY.match(key) and item["LastModified"] <= cutoff:
                    yield key

    def incomplete_uploads(self) -> list[dict]:
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix)
        return [upload for page in pages for upload in page.get("Uploads", [])]

    def sweep_incomplete(self, older_than: timedelta, thorough: bool = False) -> int:
        cutoff = datetime.now(UTC) - older_than
        removed = 0
        for upload in self.incomplete_uploads():
            if upload["Initiated"] <= cutoff:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                   UploadId=upload["UploadId"])
                removed += 1
        return removed

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.name(key)}"

    def close(self) -> None:
        self.client.close()


def check_media_url(media_url: str | None) -> None:
    """Raises BadMediaUrl, one sentence, unless MEDIA_URL names a backend this store knows."""
    if not media_url:
        return
    parts = urlsplit(media_url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("", "file", "postgresql", "postgres", "s3"):
        raise BadMediaUrl(
            f"MEDIA_URL must be a folder, file://, postgresql:// or s3:// URL, not {scheme}://"
        )
    if scheme == "s3" and not parts.netloc:
        raise BadMediaUrl("MEDIA_URL s3://BUCKET/PREFIX needs a bucket name")


def open_media_store(media_url: str | None, default_root: Path) -> MediaStore:
    """The backend MEDIA_URL names: unset or a path or file:// (a folder), postgresql://, s3://."""
    check_media_url(media_url)
    if not media_url:
        return FolderMediaStore(default_root)
    parts = urlsplit(media_url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme in ("postgresql", "postgres"):
        # psycopg (3) always: chunks are read in its binary format.
        return PostgresMediaStore("postgresql+psycopg" + media_url[len(parts.scheme):])
    if scheme == "s3":
        query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
        return S3MediaStore(parts.netloc, parts.path, query.get("endpoint_url"),
                            query.get("region"))
    if scheme == "file":
        return FolderMediaStore(Path(parts.path))
    return FolderMediaStore(Path(media_url))
