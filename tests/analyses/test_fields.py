"""Checks that several analyses' configs share (moelens.analyses.fields)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelens.analyses.fields import FORWARD_DTYPES, check_forward_dtype, name_tuple, prompts_value
from moelens.errors import ConfigError

VALID = ("a", "b", "c")


def test_name_tuple_keeps_the_order_given_once_each():
    assert name_tuple(None, VALID, "edit") is None
    assert name_tuple("c, a,,c", VALID, "edit") == ("c", "a")
    assert name_tuple(["b", "b"], VALID, "edit") == ("b",)


def test_name_tuple_names_the_first_unknown_name_and_an_empty_list():
    with pytest.raises(ConfigError, match=r"^edit 'x': choose from a, b, c$"):
        name_tuple("a,x,y", VALID, "edit")
    with pytest.raises(ConfigError, match=r"^site 'x' is not a knockout site; choose from a, b, c$"):
        name_tuple(("x",), VALID, "site", " is not a knockout site;")
    with pytest.raises(ConfigError, match=r"^no sites given; name at least one$"):
        name_tuple(" , ", VALID, "site")


def test_check_forward_dtype():
    assert [check_forward_dtype(d) for d in FORWARD_DTYPES] == list(FORWARD_DTYPES)
    with pytest.raises(ConfigError, match=r"^dtype 'float64': choose one of auto, float32, bfloat16, float16$"):
        check_forward_dtype("float64")


def test_prompts_are_a_path_kept_as_text_or_items_passed_through_one_function():
    assert prompts_value("facts.jsonl", "none", str.upper) == "facts.jsonl"
    assert prompts_value(Path("a") / "facts.jsonl", "none", str.upper) == "a/facts.jsonl"
    assert prompts_value(["x", "y"], "none", str.upper) == ("X", "Y")
    assert prompts_value((), "none", str.upper) == ()
    with pytest.raises(ConfigError, match=r"^no prompts here$"):
        prompts_value(None, "no prompts here", str.upper)
