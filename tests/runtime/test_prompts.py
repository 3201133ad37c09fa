"""Prompts files: checks that name the line, subject spans by character overlap, target tokens,
ROME's token groups."""

from __future__ import annotations

import json

import pytest

from moelens.errors import ConfigError
from moelens.runtime.prompts import PromptRecord, read_prompts, tokenise


@pytest.fixture(scope="module")
def tok():
    from moelens.zoo.tokenizer import build_tokenizer

    return build_tokenizer("the capital of new york is albany miles davis plays trumpet".split())


def _write(tmp_path, lines):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_ids_are_file_lines_and_blank_lines_are_skipped(tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt": "a b", "subject": "a"}), "", json.dumps({"prompt": "c d", "subject": "d", "target": "e"})])
    records = read_prompts(path)
    assert [(r.prompt_id, r.subject, r.target) for r in records] == [(0, "a", None), (2, "d", "e")]


@pytest.mark.parametrize("lines, message", [
    (["not json"], "line 1: not JSON"),
    ([json.dumps({"prompt": "a b"})], 'line 1: no "subject"'),
    ([json.dumps({"subject": "a"})], 'line 1: no "prompt"'),
    ([json.dumps({"prompt": "a b", "subject": "a"}), json.dumps({"prompt": "a b", "subject": "z"})], "line 2: subject 'z' is not in the prompt"),
    ([json.dumps({"prompt": "a b", "subject": ""})], 'line 1: "subject" must be a non-empty string'),
    ([json.dumps({"prompt": "a b", "subject": "a", "target": 3})], 'line 1: "target" must be a non-empty string'),
    ([json.dumps(["a", "b"])], "line 1: expected a JSON object"),
    ([""], "holds no prompts"),
])
def test_bad_prompts_files_name_the_line(tmp_path, lines, message):
    with pytest.raises(ConfigError, match=message):
        read_prompts(_write(tmp_path, lines))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl")


def test_subject_tokens_overlap_the_first_occurrence_and_the_target_follows_the_prompt(tok):
    p = tokenise(tok, PromptRecord(4, "the capital of new york is", "new york", "albany"))
    # <bos> the capital of new york is -> subject = tokens 4, 5
    assert p.subject_positions == (4, 5) and p.last == 6
    assert p.target_id == tok.convert_tokens_to_ids("albany")
    kinds = [p.token_kind(i) for i in range(p.length)]
    assert kinds == ["before_subject"] * 4 + ["first_subject", "last_subject", "last"]
    # a partial-word subject still selects the token whose characters it overlaps
    q = tokenise(tok, PromptRecord(0, "miles davis plays the trumpet", "avi"))
    assert q.subject_positions == (2,) and q.target_id is None
    assert [q.token_kind(i) for i in range(q.length)] == ["before_subject", "before_subject", "last_subject", "first_after", "further", "last"]


def test_a_subject_no_token_covers_is_an_error_naming_the_line(tok):
    with pytest.raises(ConfigError, match="line 8: no token of the prompt covers the subject"):
        tokenise(tok, PromptRecord(7, "the capital is ", " "), source="facts.jsonl")
