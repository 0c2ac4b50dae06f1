"""Live conversations' KV caches, least recently used first out, under a byte budget, so a
follow-up question only prefills its new tokens.

Entries are stored as they are given (an SAQ `StaircaseCache` by default, a DynamicCache for the
baseline); `nbytes(kv)` tells what each one holds.
"""

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Conversation:
    """What a conversation's next turn continues from."""

    token_ids: list[int]  # the tokens whose keys and values `kv` holds
    messages: list[dict]  # the chat messages those tokens encode
    kv: Any
    nbytes: int


class ConversationCache:
    """Thread-safe LRU of conversations keyed by conversation id, bounded in bytes."""

    def __init__(self, budget_bytes: int, nbytes: Callable[[Any], int]):
        self.budget_bytes = budget_bytes
        self._nbytes = nbytes
        self._entries: OrderedDict[Any, Conversation] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def take(self, key) -> Conversation | None:
        """The conversation, removed from the cache (its turn extends it, then puts it back)."""
        with self._lock:
            return self._entries.pop(key, None)

    def put(self, key, token_ids: list[int], messages: list[dict], kv) -> None:
        """Keep a conversation; evict the least recently used ones beyond the budget. One larger
        than the whole budget is not kept."""
        size = self._nbytes(kv)
        with self._lock:
            self._entries.pop(key, None)
            if size > self.budget_bytes:
                self.evictions += 1
                return
            self._entries[key] = Conversation(list(token_ids), list(messages), kv, size)
            while self.held_bytes() > self.budget_bytes:
                self._entries.popitem(last=False)
                self.evictions += 1

    def held_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries
