"""Tile look-ups of the web gallery served from memory: a built mosaic's tiles never change, so
each tile's JSON and car photo are kept, ready to send, in an LRU bounded by bytes.

Entries also expire after a while, so a car relabelled in the library (or removed from it)
shows up without a restart; the photo bytes themselves are content-addressed and never change.
"""

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from core.gallery import TileLookup
from storage.models import Mosaic

# Mosaic rows are a few hundred bytes; this many cover every gallery we know of.
MAX_MOSAICS = 256


@dataclass(frozen=True)
class CachedTile:
    label: str
    json_body: bytes
    json_etag: str
    photo: bytes
    photo_type: str
    photo_etag: str

    @classmethod
    def of(cls, found: TileLookup, mosaic_id: int) -> "CachedTile":
        body = json.dumps(
            {
                "label": found.label,
                "row": found.row,
                "col": found.col,
                "car": found.car_info,
                "is_original": found.is_original,
                "note": found.note,
                "photo": f"/api/mosaics/{mosaic_id}/tiles/{found.label}/photo",
            }
        ).encode()
        return cls(found.label, body, _etag(body), found.image_bytes, found.content_type,
                   _etag(found.image_bytes))

    @property
    def size(self) -> int:
        # The two bodies dominate; the rest is a few hundred bytes of object overhead.
        return len(self.json_body) + len(self.photo) + 512


def _etag(data: bytes) -> str:
    return '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'


class TileCache:
    """(mosaic id, row, col) -> CachedTile, least recently used out first past `max_bytes`;
    `max_bytes` 0 keeps nothing (every look-up reads the database and the media store)."""

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._clock = clock
        self._tiles: OrderedDict[tuple[int, int, int], tuple[float, CachedTile]] = OrderedDict()
        self._mosaics: OrderedDict[int, tuple[float, Mosaic]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tiles)

    def tile(self, key: tuple[int, int, int]) -> CachedTile | None:
        entry = self._tiles.get(key)
        if entry is None or entry[0] < self._clock():
            if entry is not None:
                self._drop(key)
            self.misses += 1
            return None
        self._tiles.move_to_end(key)
        self.hits += 1
        return entry[1]

    def keep_tile(self, key: tuple[int, int, int], tile: CachedTile) -> None:
        if tile.size > self.max_bytes:
            return
        if key in self._tiles:
            self._drop(key)
        self._tiles[key] = (self._clock() + self.ttl_s, tile)
        self.bytes += tile.size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._tiles)))

    def _drop(self, key: tuple[int, int, int]) -> None:
        _, tile = self._tiles.pop(key)
        self.bytes -= tile.size

    def mosaic(self, mosaic_id: int) -> Mosaic | None:
        entry = self._mosaics.get(mosaic_id)
        if entry is None or entry[0] < self._clock():
            self._mosaics.pop(mosaic_id, None)
            return None
        self._mosaics.move_to_end(mosaic_id)
        return entry[1]

    def keep_mosaic(self, mosaic: Mosaic) -> None:
        if self.max_bytes <= 0:
            return
        self._mosaics[mosaic.id] = (self._clock() + self.ttl_s, mosaic)
        self._mosaics.move_to_end(mosaic.id)
        if len(self._mosaics) > MAX_MOSAICS:
            self._mosaics.popitem(last=False)
