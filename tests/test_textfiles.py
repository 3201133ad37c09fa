"""The one text reader: every damaged text file gives one error naming the file and the line."""

from __future__ import annotations

import pytest

from moelens.errors import ConfigError, RunDirectoryError
from moelens.textfiles import read_json, read_jsonl, read_lines, read_text


def test_utf8_with_bom_and_lines(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("\ufeffé one\n\n  \ntwo\n".encode("utf-8"))
    assert read_text(p, "text file").startswith("é one")
    assert read_lines(p, "text file") == [(1, "é one"), (4, "two")]


@pytest.mark.parametrize("reader", [read_text, read_lines, read_json, lambda p, w: list(read_jsonl(p, w))])
def test_non_utf8_names_file_and_line(tmp_path, reader):
    p = tmp_path / "facts.jsonl"
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"facts\.jsonl line 2: not UTF-8 text \(byte 0xe9"):
        reader(p, "facts file")


def test_jsonl_bad_line_is_numbered_from_one(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"a": 1}\n\n{oops}\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl line 3: not JSON"):
        list(read_jsonl(p, "prompts file"))
    assert next(read_jsonl(tmp_path / "p.jsonl", "prompts file")) == (1, {"a": 1})


def test_json_error_line_and_error_class(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(RunDirectoryError, match=r"manifest\.json line 4: not valid JSON"):
        read_json(p, "manifest", RunDirectoryError)


def test_missing_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_text(tmp_path / "none.txt", "text file")
    with pytest.raises(ConfigError, match="is not a file"):
        read_text(tmp_path, "text file")
