"""Tile coordinates: letters for the column, a number for the row, as on the preview."""

import pytest

from core.errors import BadCoordinate
from core.mosaic import column_label, format_coordinate, parse_coordinate


def test_columns_run_like_a_spreadsheet():
    assert [column_label(c) for c in (0, 1, 25, 26, 27, 51, 52, 701, 702)] == [
        "A", "B", "Z", "AA", "AB", "AZ", "BA", "ZZ", "AAA"
    ]


def test_every_cell_round_trips_through_its_label():
    rows, cols = 30, 60
    for row in range(rows):
        for col in range(cols):
            assert parse_coordinate(format_coordinate(row, col), rows, cols) == (row, col)


def test_letters_are_case_insensitive_and_spaces_are_ignored():
    assert parse_coordinate("c7", 10, 10) == parse_coordinate(" C7 ", 10, 10) == (6, 2)
    assert parse_coordinate("aa12", 20, 40) == (11, 26)


def test_row_comma_column_counts_from_one():
    assert parse_coordinate("3,7", 10, 10) == (2, 6)
    assert parse_coordinate("3, 7", 10, 10) == parse_coordinate("G3", 10, 10)


@pytest.mark.parametrize("text", ["I1", "A7", "A0", "AA1", "0,1", "7,1", "1,9"])
def test_off_grid_is_one_clear_sentence(text):
    with pytest.raises(BadCoordinate) as error:
        parse_coordinate(text, 6, 8)
    message = str(error.value)
    assert "off the grid" in message and "A to H" in message and "1 to 6" in message
    assert message.endswith(".") and "\n" not in message


@pytest.mark.parametrize("text", ["", "hello", "7C", "C-1", "C 7 8", "ABCD1", "1,2,3"])
def test_text_that_is_no_coordinate_is_refused(text):
    with pytest.raises(BadCoordinate, match="not a tile coordinate"):
        parse_coordinate(text, 6, 8)
