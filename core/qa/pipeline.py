"""The answer pipeline: photo -> visual evidence and library match -> knowledge-base retrieval ->
backend -> cited answer, with the seconds each stage took.
"""

import time
from collections.abc import Callable

from core.context import AppContext
from core.images import decode_image
from core.qa.backends import Answer, AnswerBackend, make_backend
from core.qa.retrieval import Fact, KnowledgeBase
from core.qa.vision import VisionTagger, VisualEvidence, not_a_car_reply
from core.worker import AnswerResult, JobView, check_question

FACTS_PER_ANSWER = 3
Progress = Callable[[str], None]


def retrieval_query(question: str, evidence: VisualEvidence | None) -> str:
    """The question, plus the matched car's fuel and standard: "does it meet the limits?" then
    finds the facts about that standard. Classifier labels are left out: "moving van" would
    pull facts about vans instead of the part the question names."""
    car = (evidence.library_car or {}) if evidence else {}
    context = [str(car[key]) for key in ("fuel", "emission_standard") if car.get(key)]
    return f"{question} ({', '.join(context)})" if context else question


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

    def answer(
        self, image: bytes | None, question: str, progress: Progress | None = None
    ) -> Answer:
        """A cited answer. Raises BadQuestion (empty or overlong question) and BadImage."""
        say = progress or (lambda _text: None)
        question = check_question(question, self.ctx.settings.max_question_chars)
        timings: dict = {}
        started = clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[f"{stage}_s"] = round(now - clock, 3)
            clock = now

        picture, evidence = None, None
        if image is not None:
            picture = decode_image(image, self.ctx.settings.max_image_pixels)
            lap("decode")
            say("Looking at the photo.")
            evidence = self.tagger.describe(picture, image)
            lap("vision")
            if not evidence.is_car:
                timings["total_s"] = round(clock - started, 3)
                return Answer(not_a_car_reply(evidence), [], timings, evidence)
        say("Looking up the facts.")
        facts = self.retrieve(question, evidence)
        lap("retrieval")
        say("Writing the answer.")
        answer = self.backend.answer(evidence, question, facts, picture)
        lap("answer")
        answer.timings = {**timings, **answer.timings, "total_s": round(clock - started, 3)}
        answer.evidence = evidence
        return answer

    def retrieve(self, question: str, evidence: VisualEvidence | None) -> list[tuple[Fact, float]]:
        """The facts the answer is grounded on, best first."""
        return self.kb.search(retrieval_query(question, evidence), self.facts_per_answer)

    def answer_job(self, job: JobView, progress: Progress) -> AnswerResult:
        """The worker's answer function: the job's photo and question -> an AnswerResult."""
        answer = self.answer(job.load_image(), job.question, progress)
        return AnswerResult(answer.text, answer.sources, answer.timings)
