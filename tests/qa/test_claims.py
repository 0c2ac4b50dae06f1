"""The claim check: a sentence is shown only when one source states its numbers, names and
sense."""

import pytest

from core.qa.claims import ClaimChecker, Source, quantities, split_sentences, strip_citations
from tests.qa.conftest import bag_of_words

EURO6_DIESEL = Source(
    "[1]",
    "Euro 6 diesel cars must emit no more than 0.080 g/km NOx (80 mg/km, down from 180 under "
    "Euro 5). The limit applies to all new cars from September 2015.",
    number=1,
    title="Euro 6 limits for diesel cars",
)
LIGHTER = Source(
    "[2]",
    "Making a car lighter reduces its fuel use and CO2: about 0.1 L/100 km less for every "
    "100 kg taken off.",
    number=2,
    title="Weight and CO2",
)
RECORD = Source("record", "Our library's record of this car: Peugeot 208, model year 2019.")


@pytest.fixture
def checker() -> ClaimChecker:
    return ClaimChecker(bag_of_words, ["nox", "diesel", "petrol", "tesla", "model 3"], 0.5)


def test_a_sentence_the_fact_states_is_supported(checker):
    sentence = "Euro 6 diesel cars must emit no more than 80 mg/km NOx."
    verdict = checker.check(sentence, [EURO6_DIESEL])
    assert verdict.supported and verdict.source is EURO6_DIESEL


def test_a_number_converted_between_units_is_supported(checker):
    sentence = "Euro 6 diesel cars must emit no more than 0.08 g/km of NOx."
    assert checker.check(sentence, [EURO6_DIESEL]).supported


def test_a_sentence_with_a_number_absent_from_its_source_is_refused(checker):
    sentence = "Euro 6 diesel cars may emit no more than 60 mg/km NOx."
    verdict = checker.check(sentence, [EURO6_DIESEL])
    assert not verdict.supported and "60 mg/km" in verdict.reason


def test_a_standard_the_source_does_not_name_is_refused(checker):
    sentence = "Euro 1 diesel cars must emit no more than 80 mg/km NOx."
    verdict = checker.check(sentence, [EURO6_DIESEL])
    assert not verdict.supported


def test_a_make_and_model_no_source_names_is_refused(checker):
    assert not checker.check("The car is a 2022 Tesla Model 3.", [EURO6_DIESEL, RECORD]).supported


def test_the_cars_own_record_supports_its_make(checker):
    assert checker.check("This car is a Peugeot 208 from model year 2019.", [RECORD]).supported


def test_a_sentence_that_reverses_its_source_is_refused(checker):
    verdict = checker.check("No, making a car lighter does not reduce its CO2.", [LIGHTER])
    assert not verdict.supported and verdict.reason == "the sense is reversed"


def test_a_sentence_about_something_else_is_refused(checker):
    assert not checker.check("The capital of France is Paris.", [EURO6_DIESEL, LIGHTER]).supported


def test_claims_from_two_facts_in_one_sentence_are_refused(checker):
    # Each source must carry the whole sentence: mixing two facts makes a new, unchecked claim.
    sentence = "Euro 6 diesel cars emit 80 mg/km NOx and save 0.1 L/100 km per 100 kg."
    assert not checker.check(sentence, [EURO6_DIESEL, LIGHTER]).supported


def test_sentences_split_at_stops_but_not_after_abbreviations():
    text = "Fuels differ, e.g. diesel and petrol. Diesel has more energy. It costs more."
    assert split_sentences(text) == [
        "Fuels differ, e.g. diesel and petrol.", "Diesel has more energy.", "It costs more."
    ]


def test_citations_are_stripped_and_read():
    assert strip_citations("It removes 90% of CO [1] [3].") == ("It removes 90% of CO.", {1, 3})


def test_quantities_keep_their_dimension_and_ranges():
    found = {(q.value, q.dimension) for q in quantities("250-300 °C, 80 mg/km and 1,000 kg")}
    assert (0.08, "mass/km") in found and (1e6, "mass") in found
    assert {(250.0, "°c"), (300.0, "°c")} <= found
