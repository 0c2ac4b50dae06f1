"""The answer pipeline: photo -> visual evidence and library match -> scope check -> knowledge-base
retrieval -> backend draft -> claim check -> the composed, cited answer, with each stage's time.
"""

import re
import time
from collections.abc import Callable, Sequence

import numpy as np

from core.context import AppContext
from core.images import decode_image
from core.qa.backends import Answer, AnswerBackend, Draft, Request, make_backend
from core.qa.claims import (
    DOMAIN_TERMS,
    ClaimChecker,
    Source,
    quantities,
    split_sentences,
    strip_citations,
)
from core.qa.compose import (
    MAX_BULLETS,
    Candidate,
    candidates_of,
    compose,
    scope_refusal,
    shown_text,
)
from core.qa.retrieval import Fact, KnowledgeBase
from core.qa.vision import VisionTagger, VisualEvidence, car_line, not_a_car_reply
from core.worker import AnswerResult, JobView, check_question

FACTS_PER_ANSWER = 3
# A follow-up reads fewer new facts: its conversation already holds the first turn's.
FACTS_PER_FOLLOW_UP = 2
# Calibrated in bench/qa.py on bench/data/qa_eval.json (see bench/results/qa-cpu.txt):
# below this cosine to the nearest fact a question is out of scope,
MIN_RELEVANCE = 0.30
# a written sentence this far from its source's closest sentence is dropped,
MIN_SIMILARITY = 0.60
# and a candidate's rank is cos(question, sentence) + FACT_WEIGHT x its fact's retrieval score
# + LM_WEIGHT x the model's standardised log-probability of it as the answer (QA_MODE=rank).
# On all 250 cases every LM weight above 0 picked worse leads (0.05: -0.4 points, 0.1: -1.2,
# 0.4: -5.2; the same with the log-probability taken relative to the sentence's own), so the
# model is a tie-breaker only.
FACT_WEIGHT = 2.0
LM_WEIGHT = 0.05
# The lead comes from the best fact: leading from any fact's best sentence was right 3 points
# less often. A second sentence of that fact joins the lead when both are short.
SHORT_LEAD_CHARS = 260
# Bullets: the best fact's other sentences, and those of facts within this retrieval score of
# the best that are at least this close to the question; none that a sentence already shown
# supports (it would say the same again).
# Calibrated on the 250 cases: no answer loses its required fact, 1.1 bullets on average
# against 2.8 before (most of the others were off the question).
BULLET_FACT_MARGIN = 0.15
MIN_BULLET_SIMILARITY = 0.35
# Two facts may say one thing in other words ("at low speeds open windows cost less fuel than
# A/C..."): a bullet this close to a shown sentence, with no number that sentence lacks, is
# the same point again. Petrol-against-diesel sentences come closer still but differ in number.
NEAR_DUPLICATE = 0.75
Progress = Callable[[str], None]


def retrieval_query(question: str, evidence: VisualEvidence | None) -> str:
    """The question, plus the matched car's fuel and standard: "does it meet the limits?" then
    finds the facts about that standard. Classifier labels are left out: "moving van" would
    pull facts about vans instead of the part the question names."""
    car = (evidence.library_car or {}) if evidence else {}
    context = [str(car[key]) for key in ("fuel", "emission_standard") if car.get(key)]
    return f"{question} ({', '.join(context)})" if context else question


# Questions about the car's own record, answered from it first ("Is it a diesel?").
_FUEL_WORDS = {
    "diesel": "diesel", "petrol": "petrol", "gasoline": "petrol", "gas": "petrol",
    "electric": "electric", "ev": "electric", "hybrid": "hybrid", "lpg": "lpg",
}  # fmt: skip
_ASKS_IS_FUEL = re.compile(
    r"\b(?:is|does|was)\s+(?:it|this|this car|this one|the car)\b.{0,30}?\b"
    r"(diesel|petrol|gasoline|gas|electric|an ev|ev|hybrid|lpg)\b", re.I
)
_ASKS_FUEL = re.compile(
    r"\b(?:what|which)\s+(?:kind of\s+|type of\s+)?fuel\b|\bfuel\s+type\b|\bwhat does "
    r"(?:it|this car) run on\b", re.I
)
_ASKS_STANDARD = re.compile(
    r"\b(?:what|which)\s+(?:emissions?\s+)?(?:standard|euro\s*(?:class|norm|standard)?|"
    r"emissions?\s+class)\b.{0,40}\b(?:it|this|this car|the car)\b|\bdoes (?:it|this car) "
    r"meet\b", re.I
)
_ASKS_CO2 = re.compile(
    r"\b(?:how much|what(?:'s| is)?(?: the)?)\s+co2\b.{0,40}\b(?:it|this|this car)\b|"
    r"\bco2 (?:figure|rating|emissions?) of (?:it|this car)\b|\bits co2\b", re.I
)
_ASKS_IDENTITY = re.compile(
    r"\bwhat\s+(?:make|model|brand|year)\b|\bwho makes (?:it|this)\b|\bhow old is "
    r"(?:it|this car)\b|\bwhat car is (?:it|this)\b", re.I
)


def record_lead(question: str, evidence: VisualEvidence | None) -> Candidate | None:
    """For a question about the library car's own fuel, standard, CO2 or identity, the
    sentence of its record that answers it; None for any other question or car."""
    car = (evidence.library_car or {}) if evidence else {}
    if not car:
        return None
    said = "Our library's record gives this car's"
    fuel = str(car.get("fuel") or "").lower()
    asked = _ASKS_IS_FUEL.search(question)
    if asked and fuel:
        wanted = _FUEL_WORDS[asked.group(1).lower().removeprefix("an ")]
        verdict = "Yes" if wanted in fuel or (wanted == "petrol" and "gasoline" in fuel) else "No"
        text = f"{verdict}: {said[0].lower()}{said[1:]} fuel as {car['fuel']}."
    elif _ASKS_FUEL.search(question) and fuel:
        text = f"{said} fuel as {car['fuel']}."
    elif _ASKS_STANDARD.search(question) and car.get("emission_standard"):
        text = f"{said} emission standard as {car['emission_standard']}."
    elif _ASKS_CO2.search(question) and car.get("co2_g_km") is not None:
        text = f"{said} CO2 as {car['co2_g_km']:g} g/km."
    elif _ASKS_IDENTITY.search(question) and (car.get("make") or car.get("model")):
        name = " ".join(str(car[k]) for k in ("make", "model") if car.get(k))
        year = f", model year {car['year']}" if car.get("year") else ""
        text = f"Our library's record gives this car as a {name}{year}."
    else:
        return None
    return Candidate(text, Source("record answer", text), 0)


def record_source(evidence: VisualEvidence | None) -> Source | None:
    """The library car's record as a sentence an answer may quote, or None."""
    if evidence is None or not evidence.library_car:
        return None
    return Source("record", f"Our library's record of this car: {car_line(evidence)}.")


def fact_sources(facts: Sequence[tuple[Fact, float]]) -> list[Source]:
    return [
        Source(f"[{n}]", fact.text, number=n, title=fact.title, origin=fact.source,
               fact_id=fact.id)
        for n, (fact, _) in enumerate(facts, start=1)
    ]  # fmt: skip


class AnswerPipeline:
    """Answers one question about one photo; safe to call from several threads."""

    def __init__(
        self,
        ctx: AppContext,
        backend: AnswerBackend | None = None,
        kb: KnowledgeBase | None = None,
        tagger: VisionTagger | None = None,
        facts_per_answer: int = FACTS_PER_ANSWER,
    ):
        self.ctx = ctx
        self.backend = backend or make_backend(ctx.settings)
        self.kb = kb or KnowledgeBase.default(cache_dir=ctx.settings.data_dir / "cache")
        self.tagger = tagger or VisionTagger(ctx)
        self.facts_per_answer = facts_per_answer
        vocabulary = [*DOMAIN_TERMS, *(k for f in self.kb.facts for k in f.keywords)]
        self.checker = ClaimChecker(self.kb.embedder.embed, vocabulary, MIN_SIMILARITY)

    def answer(
        self,
        image: bytes | None,
        question: str,
        progress: Progress | None = None,
        history: Sequence[tuple[str, str]] = (),
        conversation_id=None,
    ) -> Answer:
        """A cited answer. Raises BadQuestion (empty or overlong question) and BadImage.

        `history`: the conversation's earlier (question, answer) turns, oldest first;
        `conversation_id` lets the backend keep the conversation's KV cache between turns."""
        say = progress or (lambda _text: None)
        question = check_question(question, self.ctx.settings.max_question_chars)
        timings: dict = {}
        started = clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[f"{stage}_s"] = round(now - clock, 3)
            clock = now

        def refused(text: str, evidence: VisualEvidence | None) -> Answer:
            timings["total_s"] = round(time.perf_counter() - started, 3)
            return Answer(text, [], timings, evidence, refused=True)

        picture, evidence = None, None
        if image is not None:
            picture = decode_image(image, self.ctx.settings.max_image_pixels)
            lap("decode")
            say("Looking at the photo.")
            evidence = self.tagger.describe(picture, image)
            lap("vision")
            if not evidence.is_car:
                return refused(not_a_car_reply(evidence), evidence)
        context = f"{history[-1][0]} {question}" if history else None
        refusal = scope_refusal(question, self.kb.relevance(context or question), MIN_RELEVANCE)
        if refusal is not None:
            return refused(refusal, evidence)
        say("Looking up the facts.")
        facts = self.retrieve(question, evidence,
                              FACTS_PER_FOLLOW_UP if history else self.facts_per_answer, context)
        lap("retrieval")
        sources, record = fact_sources(facts), record_source(evidence)
        candidates = candidates_of(sources + ([record] if record else []))
        say("Putting the answer together.")
        draft = self.backend.draft(Request(
            question, evidence, facts, picture, [c.text for c in candidates], history,
            conversation_id,
        ))  # fmt: skip
        lap("model")
        ranked = self.rank(question, candidates, facts, draft)
        own = record_lead(question, evidence)
        if own is not None:
            lead = [own]
        else:
            lead = self.supported_sentences(draft.written, sources, record) or self.lead(ranked)
        if history and record is not None and record.text in history[-1][1]:
            record = None  # the answer before already showed the car's record
        unsure = evidence is not None and not evidence.may_describe
        bullets = self.bullets(ranked, lead, facts, history[-1][1] if history else "")
        text, cited = compose(lead, bullets, record, unsure_photo=unsure)
        lap("compose")
        timings = {**timings, **draft.timings, "total_s": round(clock - started, 3)}
        shown = [{"n": n, "id": s.fact_id, "title": s.title, "source": s.origin}
                 for n, s in enumerate(cited, start=1)]  # fmt: skip
        return Answer(text, shown, timings, evidence, model_text=draft.written)

    def retrieve(
        self,
        question: str,
        evidence: VisualEvidence | None,
        k: int | None = None,
        context: str | None = None,
    ) -> list[tuple[Fact, float]]:
        """The facts the answer is grounded on, best first: those closest to the question, with
        the best fact for the matched car's fuel and standard in place of the last one when it
        scores higher (so "does it meet the limits?" finds its standard, while "which parts
        pollute?" still gets facts about parts rather than a list of limits). A follow-up's
        `context` (the earlier question with this one) is searched with it."""
        k = k or self.facts_per_answer
        facts = self.kb.search(question, k, context)
        query = retrieval_query(question, evidence)
        if query == question or not facts or context:
            return facts
        best, score = self.kb.search(query, 1)[0]
        if all(best.id != fact.id for fact, _ in facts) and score > facts[-1][1]:
            facts = [*facts[:-1], (best, score)]
        return facts

    def rank(
        self,
        question: str,
        candidates: list[Candidate],
        facts: Sequence[tuple[Fact, float]],
        draft: Draft,
    ) -> list[Candidate]:
        """Candidates best first: meaning, their fact's retrieval score, the model's choice."""
        if not candidates:
            return []
        similarity = self.checker.vectors([c.text for c in candidates]) @ self.kb.vector(question)
        best_fact = facts[0][1] if facts else 0.0
        fact_score = np.array([
            facts[c.source.number - 1][1] if c.source.number else best_fact for c in candidates
        ])  # fmt: skip
        score = similarity + FACT_WEIGHT * fact_score
        if draft.scores is not None and len(draft.scores) == len(candidates):
            lm = np.asarray(draft.scores)
            score = score + LM_WEIGHT * (lm - lm.mean()) / (lm.std() + 1e-6)
        for candidate, value, near in zip(candidates, score, similarity, strict=True):
            candidate.score, candidate.similarity = float(value), float(near)
        return sorted(candidates, key=lambda c: -c.score)

    @staticmethod
    def lead(ranked: list[Candidate]) -> list[Candidate]:
        """The best fact's best sentence, with its next best when the two are short, in the
        fact's own order; the best candidate when no fact was found."""
        first = [c for c in ranked if c.source.number == 1]
        if not first:
            return ranked[:1]
        lead = first[:1]
        if len(first) > 1 and len(first[0].text) + len(first[1].text) <= SHORT_LEAD_CHARS:
            lead = sorted(first[:2], key=lambda c: c.position)
        return lead

    def bullets(
        self,
        ranked: list[Candidate],
        lead: list[Candidate],
        facts: Sequence[tuple[Fact, float]],
        earlier: str = "",
    ) -> list[Candidate]:
        """Ranked fact sentences worth a bullet: the best fact's, or on the question from a fact
        that scored near the best one; each adding something to what is already shown, in this
        answer or in `earlier` (the answer a follow-up follows)."""
        if not facts:
            return []
        floor = facts[0][1] - BULLET_FACT_MARGIN
        shown = [Source("shown", c.text) for c in lead]
        if earlier:
            shown.append(Source("earlier", shown_text(earlier)))
        kept = []
        for candidate in ranked:
            number = candidate.source.number
            if number is None or candidate in lead:
                continue
            if number > 1 and (facts[number - 1][1] < floor
                               or candidate.similarity < MIN_BULLET_SIMILARITY):  # fmt: skip
                continue
            if self.checker.check(candidate.text, shown).supported or self._restates(
                candidate.text, shown
            ):
                continue
            kept.append(candidate)
            shown.append(Source("shown", candidate.text))
            if len(kept) == MAX_BULLETS:
                break
        return kept

    def _restates(self, text: str, shown: list[Source]) -> bool:
        """Whether a shown sentence says nearly the same, with every number of the text."""
        sentences = [sentence for source in shown for sentence in source.sentences]
        if not sentences:
            return False
        near = self.checker.vectors(sentences) @ self.checker.vectors([text])[0]
        wanted = quantities(text)
        return any(
            closeness >= NEAR_DUPLICATE
            and all(any(q.matches(have) for have in quantities(sentence)) for q in wanted)
            for sentence, closeness in zip(sentences, near, strict=True)
        )

    def supported_sentences(
        self, written: str, sources: list[Source], record: Source | None
    ) -> list[Candidate]:
        """The model's sentences that pass the claim check, each tied to the source that
        supports it; a sentence citing facts is checked against those facts only."""
        kept = []
        everything = sources + ([record] if record else [])
        for position, sentence in enumerate(split_sentences(written)):
            text, cited = strip_citations(sentence)
            against = [s for s in sources if s.number in cited] if cited else everything
            if record is not None and cited:
                against.append(record)
            verdict = self.checker.check(text, against)
            if verdict.supported:
                kept.append(
                    Candidate(text, verdict.source, position, similarity=verdict.similarity)
                )
        return kept

    def answer_job(self, job: JobView, progress: Progress) -> AnswerResult:
        """The worker's answer function: the job's photo and question -> an AnswerResult."""
        answer = self.answer(
            job.load_image(), job.question, progress,
            history=job.history, conversation_id=job.conversation_id,
        )  # fmt: skip
        return AnswerResult(answer.text, answer.sources, answer.timings)
