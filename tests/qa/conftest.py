"""A deterministic stand-in for MiniLM, for tests that check logic rather than embeddings."""

import re

import numpy as np


def bag_of_words(texts):
    """Hashed word counts, unit length: similar wording gives similar vectors."""
    rows = np.zeros((len(texts), 256), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            rows[i, sum(map(ord, word)) % 256] += 1
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)
