"""The answer a person reads: one or two sentences that answer the question, the key facts as
bullets, the car's own record when the photo is a library car, then the numbered sources.

Every sentence shown is either a sentence of a cited fact or of the car's record, or a sentence
the model wrote that `ClaimChecker` found supported. Questions the bot cannot support get one
polite sentence instead (`scope_refusal`).
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

from core.qa.claims import Source, split_sentences

# Discord cuts messages at 2,000 characters; keep a margin for the adapters' own words.
MAX_ANSWER_CHARS = 1900
MAX_BULLETS = 3
MAX_LEAD_SENTENCES = 2
# The line an answer ends with, "Sources: [1] Title (origin); ...", to its end.
SOURCES_LINE = re.compile(r"\n*Sources:.*\Z", re.S)
_CITATION = re.compile(r"\s*\[\d+\]")
UNSURE_PHOTO = "I could not tell what is in the photo, so this rests on the facts alone."
SCOPE_REPLY = (
    "I answer questions about cars and their environmental impact: their parts, fuels, "
    "emissions and emission standards, CO2, tyres and how to drive or maintain them cleaner, "
    'in English; for example "Which parts of this car pollute?"'
)
# A pronoun at the start, or right after an opening phrase ("Used mostly for short trips, its
# filter..."), means the sentence leans on the one before it in its fact.
_LEANING = re.compile(
    r"^(?:[^,.;]{0,60},\s+)?(?:it|its|this|these|that|those|they|them|their|such|both|so|then)\b",
    re.I,
)
_INJECTION = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b.{0,40}\b(?:instructions?|rules|prompt|above|"
    r"previous|everything)\b|system prompt|\byou are now\b|\bpretend\b|\bjailbreak|\bDAN\b|"
    r"developer mode|\bact as\b|\bfrom now on\b|\bforget (?:the|all|about|everything)\b|"
    r"\brole-?play\b|\breveal\b.{0,30}\b(?:prompt|instructions)|"
    r"\brepeat\b.{0,30}\b(?:prompt|instructions)",
    re.IGNORECASE,
)
_ENGLISH = frozenset(
    "the a an is are was were do does did what which how why when where who can could should "
    "would will my this that it its of to in on for with and or not car cars tyre tyres tire "
    "engine fuel".split()
)
_FOREIGN = frozenset(
    "le la les des est une un du de quelle quelles quel quels pourquoi comment voiture pièces "
    "cette ce qui que sont der die das ist ein eine welche welcher wie warum auto autos dieses "
    "diesem und nicht el los las es una qué cuál cuáles coche este esta por cómo son il lo gli "
    "è che della questa perché macchina het een wat hoe waarom deze zijn o os um uma é carro "
    "quais porque".split()
)
# Words that place a question in the domain; without one, retrieval must be surer.
_DOMAIN = re.compile(
    r"\b(?:cars?|vehicles?|this|it|its|engines?|motors?|fuels?|petrol|gasoline|diesel|electric|"
    r"hybrid|ev|tyres?|tires?|brakes?|exhaust|emissions?|emit|pollut\w*|co2|nox|euro|"
    r"standards?|drive|driving|battery|charging|oil|adblue|catalytic|filter|pickups?|trucks?|"
    r"suv|vans?|mpg|mileage|km|miles?)\b",
    re.IGNORECASE,
)
UNNAMED_MARGIN = 0.15
_LATIN_LETTER = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ]")
_ANY_LETTER = re.compile(r"[^\W\d_]")


@dataclass
class Candidate:
    """A sentence the answer may show, where it comes from, and how well it answers."""

    text: str
    source: Source
    position: int  # its place in the source, for keeping a fact's sentences in order
    score: float = 0.0
    similarity: float = 0.0  # cosine to the question


def scope_refusal(question: str, relevance: float, min_relevance: float) -> str | None:
    """SCOPE_REPLY when the question is not one the knowledge base can support, else None.

    A question naming nothing of the domain ("the weather in Berlin") needs a closer fact: a
    word such as "cold" alone makes MiniLM find the cold-weather fuel fact."""
    if _INJECTION.search(question) or is_foreign(question):
        return SCOPE_REPLY
    needed = min_relevance if _DOMAIN.search(question) else min_relevance + UNNAMED_MARGIN
    return SCOPE_REPLY if relevance < needed else None


def is_foreign(text: str) -> bool:
    """A question not written in English: another script, or more foreign than English words."""
    letters = _ANY_LETTER.findall(text)
    if not letters:
        return False
    latin = sum(1 for letter in letters if _LATIN_LETTER.match(letter))
    if latin < 0.7 * len(letters):
        return True
    words = re.findall(r"[^\W\d_]+", text.lower())
    english = sum(word in _ENGLISH for word in words)
    foreign = sum(word in _FOREIGN for word in words)
    return foreign >= 2 and foreign > english


def candidates_of(sources: Sequence[Source]) -> list[Candidate]:
    """Every sentence of every source, a leaning sentence joined to the one it leans on."""
    found = []
    for source in sources:
        joined: list[str] = []
        for sentence in source.sentences:
            if joined and _LEANING.match(sentence):
                joined[-1] = f"{joined[-1]} {sentence}"
            else:
                joined.append(sentence)
        found += [Candidate(text, source, i) for i, text in enumerate(joined)]
    return found


def compose(
    lead: Sequence[Candidate],
    ranked: Sequence[Candidate],
    record: Source | None = None,
    unsure_photo: bool = False,
) -> tuple[str, list[Source]]:
    """The answer text (ending with its sources) and the sources it cites, in citation order.

    `lead`: the sentences that answer the question (the model's supported sentences, or the best
    candidate); `ranked`: the other candidates, best first, for the bullets.
    """
    lead = _distinct(list(lead)[:MAX_LEAD_SENTENCES], [])
    bullets = _distinct([c for c in ranked if c.source.number is not None], lead)[:MAX_BULLETS]
    while True:
        text, cited = _render(lead, bullets, record, unsure_photo)
        if len(text) <= MAX_ANSWER_CHARS or not bullets:
            return text, cited
        bullets = bullets[:-1]


def _distinct(candidates: list[Candidate], shown: list[Candidate]) -> list[Candidate]:
    """Candidates with no sentence already shown, and none twice."""
    kept: list[Candidate] = []
    for candidate in candidates:
        if first_repeat(" ".join(c.text for c in [*shown, *kept, candidate])) is None:
            kept.append(candidate)
    return kept


def _key(sentence: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", sentence.lower()))


def _render(
    lead: list[Candidate], bullets: list[Candidate], record: Source | None, unsure_photo: bool
) -> tuple[str, list[Source]]:
    order: list[Source] = []

    def cite(candidate: Candidate) -> str:
        if candidate.source.number is None:
            return candidate.text
        if candidate.source not in order:
            order.append(candidate.source)
        return f"{_no_stop(candidate.text)} [{order.index(candidate.source) + 1}]."

    parts = [UNSURE_PHOTO] if unsure_photo else []
    parts.append(" ".join(cite(c) for c in lead))
    if bullets:
        parts.append("\n".join(f"• {cite(c)}" for c in bullets))
    if record is not None and not any(c.source is record for c in lead):
        parts.append(record.text)
    if order:
        parts.append(
            "Sources: " + "; ".join(f"[{n}] {s.title} ({s.origin})" for n, s in enumerate(order, 1))
        )
    return "\n\n".join(parts), order


def shown_text(answer: str) -> str:
    """An answer's sentences without its bullets' marks, citations and sources line."""
    return _CITATION.sub("", SOURCES_LINE.sub("", answer).replace("•", " "))


def _no_stop(text: str) -> str:
    return text[:-1] if text.endswith(".") else text


def first_repeat(text: str, ngram: int = 8) -> str | None:
    """A sentence or an 8-word phrase that the text says twice, or None."""
    sentences = [_key(s) for s in split_sentences(re.sub(r"\[\d+\]", "", text))]
    seen: set[str] = set()
    for sentence in sentences:
        if sentence and sentence in seen:
            return sentence
        seen.add(sentence)
    words = _key(_CITATION.sub("", SOURCES_LINE.sub("", text))).split()
    grams: set[tuple[str, ...]] = set()
    for i in range(len(words) - ngram + 1):
        gram = tuple(words[i : i + ngram])
        if gram in grams:
            return " ".join(gram)
        grams.add(gram)
    return None
