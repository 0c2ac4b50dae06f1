"""Throw-away servers for storage tests and bench/hosts.py: Debian's PostgreSQL on a Unix
socket (or an address given), and moto's S3 server on loopback as the S3 protocol stand-in
(no S3-compatible server is packaged here)."""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_PORT = 55_434


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, or in Debian's versioned folder (not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def postgres_missing() -> str | None:
    """Why no PostgreSQL server can start here, or None when one can."""
    if not (postgres_bin("initdb") and postgres_bin("pg_ctl")):
        return "the PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    return None


def as_server_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "nobody", "--", *command] if os.geteuid() == 0 else command


class PostgresServer:
    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port

    def url(self, database: str, host: str | None = None) -> str:
        """Over TCP to `host`, or over the Unix socket (no network at all) when None."""
        if host:
            return f"postgresql+psycopg://postgres@{host}:{self.port}/{database}"
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}&port={self.port}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host=str(self.root), port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextmanager
def postgres_server(port: int = PG_PORT, listen: list[str] | None = None,
                    trust: str | None = None,
                    wrap: list[str] | None = None) -> Iterator[PostgresServer]:
    """initdb + pg_ctl start in a temporary folder, always on a Unix socket there; `listen`
    addresses for TCP too, trusting clients from the `trust` network (CIDR); `wrap` a command
    prefix such as `ip netns exec NS`, to start the server inside a network namespace."""
    root = Path(tempfile.mkdtemp(prefix="talkmosaic-pg-"))
    root.chmod(0o777)
    data = root / "data"
    prefix = wrap or []
    run = dict(check=True, capture_output=True)
    subprocess.run(as_server_user([postgres_bin("initdb"), "-D", str(data), "-U", "postgres",
                                   "--auth=trust", "-E", "UTF8", "--no-sync"]), **run)
    if trust:
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {trust} trust\n")
    addresses = ",".join(listen or [])
    options = (f"-k {root} -p {port} -c listen_addresses='{addresses}' -c fsync=off "
               "-c max_connections=200")
    subprocess.run(prefix + as_server_user([postgres_bin("pg_ctl"), "-D", str(data), "-o",
                                            options, "-l", str(root / "log"), "-w", "start"]),
                   **run)
    try:
        yield PostgresServer(root, port)
    finally:
        subprocess.run(prefix + as_server_user([postgres_bin("pg_ctl"), "-D", str(data), "-m",
                                                "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's server mode in its own process on loopback; yields its endpoint URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def fake_aws_credentials(environ) -> None:
    """moto accepts any credentials; boto3 still insists on having some."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        environ.setdefault(name, value)
