"""The request field table: its checks, and that PROTOCOL.md's `generate` table says what it says."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gllm.request_fields import BRIDGE_FIELDS, FIELDS_BY_NAME, REQUEST_FIELDS, FieldError

PROTOCOL = Path(__file__).resolve().parent.parent / "bindings" / "PROTOCOL.md"
WIRE_TYPES = {"int": "int", "float": "float", "bool": "bool", "str_list": "[str]", "str": "str", "json": "map or str"}


def _generate_rows() -> dict[str, list[str]]:
    text = PROTOCOL.read_text()
    section = text[text.index("**`generate`**"):text.index("**`cancel`**")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[2] == "opt" and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_protocol_md_generate_table_matches_the_field_table():
    rows = _generate_rows()
    assert set(rows) == {f.wire_name for f in BRIDGE_FIELDS}
    for f in BRIDGE_FIELDS:
        wire_type, _, default, limits = rows[f.wire_name]
        assert wire_type == WIRE_TYPES[f.kind], f.name
        shown = {None: ("random", "nil (off)"), (): ("`[]`",), True: ("true",), False: ("false",)}.get(
            f.default if not isinstance(f.default, (int, float)) or isinstance(f.default, bool) else "num")
        assert default in (shown or (str(f.default),)), (f.name, default)
        assert limits.startswith(f.limits), (f.name, limits, f.limits)


@pytest.mark.parametrize("f", REQUEST_FIELDS, ids=lambda f: f.name)
def test_each_field_takes_its_range_and_names_itself(f):
    assert f.check(f.default) == f.default
    if f.kind in ("int", "float"):
        assert f.check(f.hi) == f.hi
        for bad in ([f.hi + 1, f.hi * 2 + 1, "1", True, [1]] + ([math.nan, math.inf] if f.kind == "float" else [1.5])):
            with pytest.raises(FieldError) as err:
                f.check(bad, "wire_name")
            assert err.value.field == "wire_name" and str(err.value).startswith("wire_name ")
    if f.kind.endswith("_list"):
        with pytest.raises(FieldError, match=f.name):
            f.check(["x"] * (f.max_items + 1) if f.kind == "str_list" else [1] * (f.max_items + 1))
        with pytest.raises(FieldError, match=f.name):
            f.check("a string")


def test_lists_become_tuples_and_none_is_only_for_nullable_fields():
    assert FIELDS_BY_NAME["stop"].check(["a", "b"]) == ("a", "b")
    assert FIELDS_BY_NAME["seed"].check(None) is None
    with pytest.raises(FieldError, match="temperature"):
        FIELDS_BY_NAME["temperature"].check(None)


def test_constraint_fields_take_strings_json_and_at_most_one():
    from gllm.request_fields import check_one_constraint
    schema = FIELDS_BY_NAME["json_schema"]
    assert schema.check({"type": "object", "b": [1, 2.5]}) == '{"type":"object","b":[1,2.5]}'
    assert schema.check(' {"type" : "object"} ') == '{"type":"object"}'      # JSON text: the same compact form
    for bad, code in [("[1]", "wrong_type"), ("{", "wrong_type"), ([1], "wrong_type"), ({"x": math.nan}, "wrong_type"),
                      ({"x": {1, 2}}, "wrong_type"), ({"x": "y" * 65536}, "out_of_range")]:
        with pytest.raises(FieldError) as err:
            schema.check(bad)
        assert (err.value.field, err.value.code) == ("json_schema", code), bad
    assert FIELDS_BY_NAME["regex"].check("a+") == "a+"
    for bad in ("", "x" * 4097, 5, ["a"]):
        with pytest.raises(FieldError, match="^regex "):
            FIELDS_BY_NAME["regex"].check(bad)
    check_one_constraint({"regex": "a", "choice": (), "json_schema": None})
    with pytest.raises(FieldError) as err:
        check_one_constraint({"json_schema": "{}", "grammar": "x"})
    assert (err.value.field, err.value.code) == ("grammar", "conflict")
