"""The grounded prompt: visual evidence, the car's record, numbered facts and the question, and
the chat messages of a conversation (earlier turns first, so their KV cache can be reused)."""

from collections.abc import Sequence

from core.qa.compose import SOURCES_LINE
from core.qa.retrieval import Fact
from core.qa.vision import VisualEvidence

SYSTEM = (
    "You are a car and environment expert. Answer the user's question in at most three short "
    "sentences, using only the numbered facts and the photo evidence. Cite every fact you use "
    "with its number in brackets, like [1]. If the facts do not answer the question, say so."
)


def grounding_text(
    question: str,
    evidence: VisualEvidence | None,
    facts: Sequence[tuple[Fact, float]],
    given: str = "",
) -> str:
    """The user turn: evidence, numbered facts (best first), then the question.

    `given`: what earlier turns already told the model; a fact stated there is named, not
    repeated, and photo evidence is not repeated either (a follow-up prefills only what is new).
    Where each fact comes from is shown to the asker, not the model: ~30 tokens a fact that
    change no answer."""
    parts = []
    if evidence is not None and "Photo evidence:" not in given:
        parts.append("Photo evidence:\n" + evidence.summary())
    numbered = "\n".join(
        f"[{n}] {fact.title} (as above)" if f"{fact.title}: {fact.text}" in given
        else f"[{n}] {fact.title}: {fact.text}"
        for n, (fact, _) in enumerate(facts, start=1)
    )  # fmt: skip
    parts.append("Facts:\n" + (numbered or "(none found)"))
    parts.append(f"Question: {question}\nAnswer briefly and cite the facts you use, like [1].")
    return "\n\n".join(parts)


def answer_body(answer: str) -> str:
    """An earlier answer as the model is reminded of it: its lead paragraph, which answered the
    question (its bullets and sources would only lengthen every later turn's prompt)."""
    lead = SOURCES_LINE.sub("", answer).strip().split("\n\n")
    return lead[1] if lead[0].startswith("I could not tell") and len(lead) > 1 else lead[0]


def conversation_messages(
    question: str,
    evidence: VisualEvidence | None,
    facts: Sequence[tuple[Fact, float]],
    history: Sequence[tuple[str, str]] = (),
    earlier: list[dict] | None = None,
) -> list[dict]:
    """System, the earlier turns, then this turn's grounded question.

    `earlier`: the messages the conversation's cached tokens encode (up to the last question);
    its last answer comes from `history`. Without them the turns are rebuilt from `history`.
    """
    if earlier is not None and history and _continues(earlier, history):
        messages = [*earlier, {"role": "assistant", "content": answer_body(history[-1][1])}]
    else:
        messages = [{"role": "system", "content": SYSTEM}]
        for asked, answered in history:
            messages += [
                {"role": "user", "content": asked},
                {"role": "assistant", "content": answer_body(answered)},
            ]
    given = "\n".join(m["content"] for m in messages if m["role"] == "user")
    turn = grounding_text(question, evidence, facts, given)
    return [*messages, {"role": "user", "content": turn}]


def _continues(earlier: list[dict], history: Sequence[tuple[str, str]]) -> bool:
    """Do the cached messages hold exactly the turns before the last one (same branch)?"""
    answers = [m["content"] for m in earlier if m["role"] == "assistant"]
    asked = sum(m["role"] == "user" for m in earlier)
    return asked == len(history) and answers == [answer_body(a) for _, a in history[:-1]]


def history_text(history: Sequence[tuple[str, str]]) -> str:
    """Earlier turns as plain text, for models given one prompt rather than a conversation."""
    if not history:
        return ""
    turns = "\n".join(f"Q: {q}\nA: {answer_body(a)}" for q, a in history)
    return f"Earlier in this conversation:\n{turns}\n\n"
