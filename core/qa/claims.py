"""The claim check: a sentence reaches a user only if one of its sources (a cited fact or the car's
own record) states every number, standard, part, fuel and name in it, in the same sense.

A sentence is supported by a source when (1) each quantity in it appears in the source with the
same unit or one a unit conversion gives (60 mg/km = 0.06 g/km), (2) each named term (Euro 6d,
R1234yf, AdBlue, DPF, petrol, Tesla, class A...) appears in the source, (3) it is negated the
same way as the source sentence closest to it, and (4) that closest sentence is close in meaning
(MiniLM cosine, threshold calibrated in bench/qa.py).
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# A sentence ends at . ! or ? followed by a capital, a digit or an opening bracket, except after
# the abbreviations the facts use.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_ABBREVIATIONS = ("e.g.", "i.e.", "approx.", "vs.", "No.", "no.", "Dr.", "St.", "U.S.", "cf.")
_CITATION = re.compile(r"\s*\[(\d+)\]")

# Standards and names with a number inside: taken as terms, never as bare numbers.
_NAMED = re.compile(
    r"\b(?:euro\s?[1-7](?:\s?[a-d])?(?:[- ](?:temp|isc-fcm|isc|fcm))?|euro\s?(?:i{1,3}|iv|v|vi)\b"
    r"|tier\s?[1-4]|bin\s?\d{1,3}|lev\s?(?:ii|iii|iv)|china\s?[5-6][ab]?|bs\s?(?:iv|vi|[4-6])"
    r"|crit'?air\s?[0-5]|r-?\d{3,4}[a-z]{0,2}|e\d{1,3}\b|b\d{1,3}\b|model\s?[3syx]\b"
    r"|\d{3}/\d{2}\s?r\d{2}|[0-9]{1,2}w-?\d{2}|3pmsf|6ppd(?:-quinone)?|h2|co2e?|nox|no2|n2o|so2"
    r"|pm2\.5|pm10|pm|pn|o2|12\s?v|48\s?v)\b",
    re.IGNORECASE,
)
# A number, optionally a range ("250-300"), and the unit after it.
_QUANTITY = re.compile(
    r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?:\s?(?:-|–|to)\s?(\d+(?:\.\d+)?))?"
    r"(?:\s?(%|per ?cent|°\s?[CF]|[a-zA-Zµ]+(?:/[a-zA-Z0-9]+)*(?:/100\s?km)?))?"
)
# Units that scale into one another; the factor takes a value to the dimension's base unit.
_UNITS = {
    "%": ("%", 1.0), "percent": ("%", 1.0), "per cent": ("%", 1.0),
    "mg/km": ("mass/km", 1e-3), "g/km": ("mass/km", 1.0), "kg/km": ("mass/km", 1e3),
    "mg/mile": ("mass/km", 1e-3 / 1.609344), "g/mile": ("mass/km", 1 / 1.609344),
    "mg": ("mass", 1e-3), "g": ("mass", 1.0), "kg": ("mass", 1e3),
    "t": ("mass", 1e6), "tonne": ("mass", 1e6), "tonnes": ("mass", 1e6),
    "lb": ("mass", 453.59237), "lbs": ("mass", 453.59237),
    "m": ("length", 1.0), "km": ("length", 1e3), "mm": ("length", 1e-3),
    "cm": ("length", 1e-2), "mile": ("length", 1609.344), "miles": ("length", 1609.344),
    "km/h": ("speed", 1.0), "mph": ("speed", 1.609344),
    "s": ("time", 1.0), "seconds": ("time", 1.0), "minute": ("time", 60.0),
    "minutes": ("time", 60.0), "hour": ("time", 3600.0), "hours": ("time", 3600.0),
    "year": ("years", 1.0), "years": ("years", 1.0),
    "l": ("volume", 1.0), "litre": ("volume", 1.0), "litres": ("volume", 1.0),
    "kwh": ("energy", 1.0), "wh": ("energy", 1e-3), "mj": ("energy", 1 / 3.6),
}  # fmt: skip
VECTOR_CACHE_SIZE = 20_000
# Bounds and emphasis that contain "no"/"not" but negate nothing.
_BOUNDS = re.compile(r"\b(?:no (?:more|less|fewer|later|earlier) than|not only|not just)\b", re.I)
# Words that change a sentence's sense when one side has them and the other does not.
_NEGATION = re.compile(
    r"\b(?:not|no|never|none|nor|cannot|without|neither|n't|isn't|doesn't|don't|won't|can't"
    r"|aren't|didn't)\b|n't\b",
    re.IGNORECASE,
)
# Named things a sentence may only state when its source does, besides the facts' keywords.
DOMAIN_TERMS = (
    "petrol", "gasoline", "diesel", "electric", "hybrid", "plug-in", "hydrogen", "lpg", "cng",
    "ethanol", "biodiesel", "hvo", "methane", "natural gas", "e-fuel", "battery",
    "catalytic converter", "three-way", "oxidation catalyst", "particulate filter", "dpf",
    "gpf", "egr", "scr", "adblue", "lambda", "oxygen sensor", "exhaust", "muffler", "turbo",
    "tyre", "tyres", "tire", "tires", "brake", "brakes", "brake pads", "air conditioning",
    "refrigerant", "radiator", "grille", "mirror", "engine", "gearbox", "spark plug",
    "injector", "fuel pump", "evaporative", "canister", "wltp", "nedc", "rde", "ftp-75",
    "epa", "carb", "cafe", "eu", "california", "china", "india", "japan", "united states",
    "europe", "tailpipe", "well-to-wheel", "carbon monoxide", "hydrocarbons",
    "nitrogen oxides", "particulate", "particle number", "ozone", "soot", "ammonia",
    "formaldehyde", "benzene", "copper", "platinum", "palladium", "rhodium", "lithium",
    "cobalt", "nickel", "class a", "class b", "class c", "class d", "class e", "class f",
    "class g", "tesla", "toyota", "volkswagen", "vw", "ford", "bmw", "mercedes", "audi",
    "renault", "peugeot", "citroen", "fiat", "nissan", "honda", "hyundai", "kia", "mazda",
    "volvo", "skoda", "seat", "opel", "vauxhall", "chevrolet", "dodge", "jeep", "ram",
    "subaru", "mitsubishi", "suzuki", "porsche", "ferrari", "lexus", "mini", "dacia",
    "prius", "golf", "corolla", "civic", "f-150", "leaf", "zoe", "sedan", "suv", "pickup",
    "van", "truck", "convertible", "minivan", "sports car",
)  # fmt: skip


@dataclass(frozen=True)
class Quantity:
    value: float
    dimension: str  # "" for a bare number
    text: str

    def matches(self, other: "Quantity") -> bool:
        if self.dimension != other.dimension:
            return False
        if self.dimension == "":
            return self.value == other.value
        return abs(self.value - other.value) <= 0.02 * max(abs(self.value), abs(other.value))


@dataclass(eq=False)
class Source:
    """One thing a sentence may rest on: a numbered fact or the car's own record."""

    label: str  # "[1]" for fact 1, "record" for the car's record
    text: str  # what the answer may quote: the fact's text, or the record as a sentence
    number: int | None = None  # the fact's number in the prompt; None for the record
    title: str = ""
    origin: str = ""  # where the fact comes from, as the sources line shows it
    fact_id: str | None = None
    sentences: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.sentences = self.sentences or split_sentences(self.text)
        checked = f"{self.title}. {self.text}" if self.title else self.text
        self.quantities = quantities(checked)
        self.lowered = " " + normalise(checked) + " "


@dataclass
class Verdict:
    supported: bool
    source: Source | None = None
    reason: str = ""
    similarity: float = 0.0


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph, abbreviations kept whole."""
    protected = text
    for i, abbreviation in enumerate(_ABBREVIATIONS):
        protected = protected.replace(abbreviation, f"\x00{i}\x00")
    pieces = []
    for piece in _SENTENCE_END.split(protected.strip()):
        for i, abbreviation in enumerate(_ABBREVIATIONS):
            piece = piece.replace(f"\x00{i}\x00", abbreviation)
        if piece.strip():
            pieces.append(piece.strip())
    return pieces


def strip_citations(sentence: str) -> tuple[str, set[int]]:
    """The sentence without its [n] marks, and the numbers it cited."""
    cited = {int(n) for n in _CITATION.findall(sentence)}
    text = _CITATION.sub("", sentence).strip()
    return re.sub(r"\s+([.,;:!?])", r"\1", text), cited


def normalise(text: str) -> str:
    text = text.lower().replace("’", "'").replace("₂", "2").replace("ₓ", "x")
    return " ".join(re.findall(r"[a-z0-9'µ°%/.+-]+", text)).replace(" .", "")


def named_terms(text: str, vocabulary: Sequence[str]) -> set[str]:
    """Standards, parts, fuels, pollutants, makes and models the text names."""
    lowered = " " + normalise(text) + " "
    found = {re.sub(r"[\s'-]", "", m.group(0).lower()) for m in _NAMED.finditer(lowered)}
    for term in vocabulary:
        if f" {term} " in lowered or f" {term}s " in lowered or f" {term}. " in lowered:
            found.add(term)
    return found


def quantities(text: str) -> list[Quantity]:
    """Every number in the text (outside standard names), with its unit's dimension."""
    stripped = _NAMED.sub(" ", text)
    found = []
    for match in _QUANTITY.finditer(stripped):
        unit = (match.group(3) or "").lower().replace(" ", "").replace("°", "°")
        unit = unit.rstrip(".")
        dimension, factor = _UNITS.get(unit, ("", 1.0))
        if unit.startswith("°"):
            dimension, factor = unit, 1.0
        for raw in filter(None, (match.group(1), match.group(2))):
            value = float(raw.replace(",", ""))
            found.append(Quantity(value * factor, dimension, match.group(0).strip()))
    return found


def is_negated(text: str) -> bool:
    return bool(_NEGATION.search(_BOUNDS.sub(" ", text)))


def term_supported(term: str, source: Source) -> bool:
    if term in source.lowered:
        return True
    # A standard like "euro6d" from the sentence against "Euro 6d" in the source.
    squeezed = re.sub(r"[\s'-]", "", source.lowered)
    return term.replace(" ", "") in squeezed


class ClaimChecker:
    """Checks sentences against sources. `embed(texts)` gives unit-length rows (MiniLM)."""

    def __init__(
        self,
        embed: Callable[[Sequence[str]], np.ndarray],
        vocabulary: Sequence[str],
        min_similarity: float,
    ):
        self.embed = embed
        self.vocabulary = sorted({t.lower() for t in vocabulary if len(t) >= 2}, key=len)
        self.min_similarity = min_similarity
        self._vectors: dict[str, np.ndarray] = {}

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of the texts, each computed once (fact sentences recur in every answer)."""
        fresh = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if len(self._vectors) + len(fresh) > VECTOR_CACHE_SIZE:
            self._vectors.clear()  # free text from models would otherwise grow it forever
        if fresh:
            self._vectors.update(zip(fresh, self.embed(fresh), strict=True))
        return np.stack([self._vectors[t] for t in texts])

    def check(self, sentence: str, sources: Sequence[Source]) -> Verdict:
        """Is the sentence supported by one of the sources? The first that supports it wins."""
        text, _ = strip_citations(sentence)
        if not text or not sources:
            return Verdict(False, reason="nothing to check against")
        wanted_numbers = quantities(text)
        wanted_terms = named_terms(text, self.vocabulary)
        negated = is_negated(text)
        vector = self.vectors([text])[0]
        best = Verdict(False, reason="no source states it")
        for source in sources:
            missing = [q.text for q in wanted_numbers
                       if not any(q.matches(s) for s in source.quantities)]  # fmt: skip
            if missing:
                reason = f"{missing[0]} is not in {source.label}"
                best = _worse(best, Verdict(False, source, reason))
                continue
            absent = [t for t in wanted_terms if not term_supported(t, source)]
            if absent:
                best = _worse(best, Verdict(False, source, f"{absent[0]} is not in {source.label}"))
                continue
            rows = self.vectors(source.sentences)
            similarities = rows @ vector
            closest = int(np.argmax(similarities))
            similarity = float(similarities[closest])
            if is_negated(source.sentences[closest]) != negated:
                best = _worse(best, Verdict(False, source, "the sense is reversed", similarity))
                continue
            if similarity < self.min_similarity:
                best = _worse(
                    best, Verdict(False, source, f"too far from {source.label}", similarity)
                )
                continue
            return Verdict(True, source, "", similarity)
        return best


def _worse(kept: Verdict, new: Verdict) -> Verdict:
    return new if new.similarity > kept.similarity or kept.source is None else kept
