"""A media writer that stops mid-write, for the crash tests:
`python -m tests.storage.media_writer MEDIA_URL MARKER [--mid-upload]`.

It streams random chunks into the store; after a few it creates MARKER and hangs, so the test
can SIGKILL it there. `--mid-upload` (S3) hangs instead once the first part has been uploaded.
"""

import argparse
import os
import time
from pathlib import Path

from storage.media import CHUNK_BYTES, open_media_store


def hang(marker: Path) -> None:
    marker.touch()
    while True:
        time.sleep(60)


def stalling_chunks(marker: Path, before_stall: int):
    for _ in range(before_stall):
        yield os.urandom(CHUNK_BYTES)
    hang(marker)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("media_url")
    parser.add_argument("marker", type=Path)
    parser.add_argument("--mid-upload", action="store_true")
    args = parser.parse_args()
    store = open_media_store(args.media_url, args.marker.parent / "media")
    if args.mid_upload:
        store.client.meta.events.register("after-call.s3.UploadPart",
                                          lambda **_: hang(args.marker))
        store.put_chunks(os.urandom(CHUNK_BYTES) for _ in range(24))
    else:
        store.put_chunks(stalling_chunks(args.marker, 3))


if __name__ == "__main__":
    main()
