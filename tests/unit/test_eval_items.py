"""Per-item accuracy of structured answers and its breakdowns, against counts by hand."""

import pytest

from aligntI.eval.items import answer_items, first_error, item_accuracy, item_scores, length_bucket


def test_items_of_each_form():
    assert answer_items("3 5 , 1 2", "space") == ["3", "5", "1", "2"]
    assert answer_items("1 8 , 2 2 , 9", "comma") == ["1 8", "2 2", "9"]
    assert answer_items("  NONE ", "comma") == ["none"]
    with pytest.raises(ValueError, match="unknown item_sep"):
        answer_items("1", "tab")


def test_item_accuracy_counts_places_and_penalises_missing_or_extra_items():
    assert item_accuracy("3 5 1 2", "3 5 1 2", "space") == 1.0
    assert item_accuracy("3 5 0 2", "3 5 1 2", "space") == 0.75
    assert item_accuracy("3 5", "3 5 1 2", "space") == 0.5  # two missing
    assert item_accuracy("3 5 1 2 7 7 7 7", "3 5 1 2", "space") == 0.5  # four extra
    assert item_accuracy("1 8 , 2 3", "1 8 , 2 2", "comma") == 0.5
    assert item_accuracy("", "", "space") == 1.0


def test_scores_by_category_length_and_region():
    records = {"a": {"item_sep": "space", "cells": [0]}, "b": {"item_sep": "space", "cells": list(range(16))},
               "c": {"item_sep": "comma", "cells": list(range(16))}}
    preds = [{"id": "a", "category": "cell", "reference": "7", "prediction": "7"},
             {"id": "b", "category": "grid", "reference": "1 2 3 4 , 5 6 7 8", "prediction": "1 2 3 4 , 5 6 7 9"},
             {"id": "c", "category": "row_sums", "reference": "1 0 , 9", "prediction": "1 0 , 9"}]
    s = item_scores(preds, records)
    assert s["all"] == {"exact": pytest.approx(200 / 3), "items": pytest.approx((100 + 87.5 + 100) / 3), "n": 3}
    assert s["cells:1"]["n"] == 1 and s["cells:16"]["items"] == pytest.approx((87.5 + 100) / 2)
    assert s["long"] == {"exact": 0.0, "items": 87.5, "n": 1}  # only b has 8+ words (9 with the comma)
    assert s["len:1-2"]["n"] == 1 and s["len:3-7"]["n"] == 1 and s["len:8-14"]["n"] == 1
    assert [length_bucket(" ".join("x" * n)) for n in (1, 2, 3, 7, 8, 14, 15, 30)] == \
        ["1-2", "1-2", "3-7", "3-7", "8-14", "8-14", "15+", "15+"]


def test_first_error_says_where_the_answer_leaves_the_reference_and_what_follows():
    assert first_error("3 5 , 1 2", "3 5 , 1 2", "space") == (None, 0, 0)
    assert first_error("3 9 , 1 2", "3 5 , 1 2", "space") == (1, 2, 2)  # one misread digit, back on the path
    assert first_error("3 9 , 4 2", "3 5 , 1 2", "space") == (1, 2, 1)
    assert first_error("5 1 2", "3 5 , 1 2", "space") == (0, 3, 0)  # a skipped digit shifts every later one
    assert first_error("3 5", "3 5 , 1 2", "space") == (2, 1, 0)  # stopped early: the rest is missing
    assert first_error("1 8 , 2 3 , 9", "1 8 , 2 2 , 9", "comma") == (1, 1, 1)
