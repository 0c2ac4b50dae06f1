"""The grounded prompt (visual evidence, the car's metadata, numbered facts, the question) and the
check that turns a model's reply into a cited answer.

A 135M model paraphrases loosely and forgets numbers, so the answer is made correct by
construction: when the reply does not state the best fact's key numbers and terms, or does not
cite it, that fact is quoted after it with its number (and the runner-up too when retrieval
could hardly tell the two apart). The reply is never rewritten, only completed.
"""

import re
from collections.abc import Sequence

from core.qa.retrieval import Fact
from core.qa.vision import VisualEvidence

SYSTEM = (
    "You are a car and environment expert. Answer the user's question in at most three short "
    "sentences, using only the numbered facts and the photo evidence. Cite every fact you use "
    "with its number in brackets, like [1]. If the facts do not answer the question, say so."
)
# A runner-up fact scoring at least this share of the best one is quoted too when missed.
CLOSE_CALL = 0.9
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_CITATION = re.compile(r"\[(\d+)\]")
_WORD = re.compile(r"[a-z0-9]+")


def grounding_text(
    question: str, evidence: VisualEvidence | None, facts: Sequence[tuple[Fact, float]]
) -> str:
    """The user turn: evidence, numbered facts (best first) with sources, then the question."""
    parts = []
    if evidence is not None:
        parts.append("Photo evidence:\n" + evidence.summary())
    numbered = "\n".join(
        f"[{n}] {fact.title}: {fact.text} (source: {fact.source})"
        for n, (fact, _) in enumerate(facts, start=1)
    )
    parts.append("Facts:\n" + (numbered or "(none found)"))
    parts.append(f"Question: {question}\nAnswer briefly and cite the facts you use, like [1].")
    return "\n\n".join(parts)


def chat_messages(
    question: str, evidence: VisualEvidence | None, facts: Sequence[tuple[Fact, float]]
) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": grounding_text(question, evidence, facts)},
    ]


def key_terms(fact: Fact) -> tuple[set[str], set[str]]:
    """(numbers, terms) a correct answer built on this fact should state."""
    numbers = set(_NUMBER.findall(fact.text))
    terms = {keyword for keyword in fact.keywords if keyword}
    return numbers, terms


def states_fact(text: str, fact: Fact) -> bool:
    """Does the text state every number of the fact and at least one of its terms (or title)?"""
    lowered = " " + " ".join(_WORD.findall(text.lower())) + " "
    numbers, terms = key_terms(fact)
    if any(number not in text for number in numbers):
        return False
    terms = terms or {" ".join(_WORD.findall(fact.title.lower()))}
    return any(f" {' '.join(_WORD.findall(term))} " in lowered for term in terms)


def ground_answer(reply: str, facts: Sequence[tuple[Fact, float]]) -> tuple[str, list[dict]]:
    """The model's reply, completed with the best fact when it misses it, and its sources.

    Citations of facts that were not given are dropped (a small model invents [7] for 4 facts).
    Returns (text ending with the sources line, sources: the cited facts in number order).
    """
    reply = _CITATION.sub(
        lambda m: m.group(0) if 1 <= int(m.group(1)) <= len(facts) else "", reply.strip()
    )
    reply = re.sub(r"[ \t]+([.,;:])", r"\1", reply)
    for n in _facts_to_quote(reply, facts):
        fact = facts[n - 1][0]
        quote = f"Key fact [{n}], {fact.title}: {fact.text}"
        reply = f"{reply}\n\n{quote}" if reply else quote
    cited = sorted({int(n) for n in _CITATION.findall(reply)})
    sources = [
        {"n": n, "id": facts[n - 1][0].id, "title": facts[n - 1][0].title,
         "source": facts[n - 1][0].source}
        for n in cited
    ]  # fmt: skip
    return f"{reply}\n\n{sources_text(sources)}" if sources else reply, sources


def _facts_to_quote(reply: str, facts: Sequence[tuple[Fact, float]]) -> list[int]:
    """Numbers of the facts to quote: the best one unless the reply states and cites it, and the
    runner-up too when retrieval could hardly tell them apart and the reply misses it as well."""
    if not facts:
        return []
    quote = []
    if not states_fact(reply, facts[0][0]) or "[1]" not in reply:
        quote.append(1)
    close = len(facts) > 1 and facts[1][1] >= CLOSE_CALL * facts[0][1]
    if close and not (states_fact(reply, facts[1][0]) and "[2]" in reply):
        quote.append(2)
    return quote


def sources_text(sources: Sequence[dict]) -> str:
    """'Sources: [1] Title (where); [2] ...' for the end of a chat answer."""
    if not sources:
        return ""
    return "Sources: " + "; ".join(f"[{s['n']}] {s['title']} ({s['source']})" for s in sources)
