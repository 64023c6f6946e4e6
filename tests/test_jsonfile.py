"""sskt_lightning.jsonfile: the one reader of the project's JSON records - an object, or none."""
import pytest

from sskt_lightning.jsonfile import load_object, read_object


@pytest.mark.parametrize("raw, why", [
    (b"[1, 2]", r"not a JSON object \(a list\)"),
    (b'"ok"', r"not a JSON object \(a str\)"),
    (b"null", r"not a JSON object \(a NoneType\)"),
    (b'{"status": "ok"', r"Expecting"),                       # cut short by a kill of a non-atomic writer
    (b"\xff\xfe{}", r"codec can't decode"),                   # not UTF-8
    (b"[" * 100_000 + b"]" * 100_000, r"nested too deeply"),  # the parser's recursion limit
])
def test_anything_but_an_object_is_no_record_and_says_why(tmp_path, raw, why):
    path = tmp_path / "results.json"
    path.write_bytes(raw)
    assert read_object(path) is None
    with pytest.raises(ValueError, match=why):
        load_object(path)


def test_an_object_is_read_and_a_missing_file_is_none(tmp_path):
    path = tmp_path / "results.json"
    assert read_object(path) is None
    with pytest.raises(FileNotFoundError):
        load_object(path)
    path.write_text('{"status": "ok", "test_acc": 0.875, "nested": {"a": [1, 2]}}', encoding="utf-8")
    assert read_object(path) == load_object(str(path)) == {"status": "ok", "test_acc": 0.875, "nested": {"a": [1, 2]}}
