"""The tab as HOMER lays it out: Go's bytewise key order, every level expanded, the UI's own ``data``."""

from __future__ import annotations

from hepsub_apiban.homer.view import SELF_REFERENCE, go_order, tab_lines


def test_keys_come_in_go_byte_order_not_python_or_locale_order() -> None:
    keys = ["t_sec", "ID", "(1) verdict", "9.9.9.9", "2a01:4f8::5", "__hep__", "Zulu", "é", "1.2.3.4"]
    assert [key for key, _ in go_order(dict.fromkeys(keys))] == [
        "(1) verdict",  # "(" is 0x28: before digits
        "1.2.3.4",
        "2a01:4f8::5",
        "9.9.9.9",
        "ID",  # upper case before "_" and lower case
        "Zulu",
        "__hep__",
        "t_sec",
        "é",  # UTF-8 0xC3: after every ASCII key
    ]


def test_every_level_is_expanded_with_list_items_under_their_index() -> None:
    answer = {
        "call@x": {"t_sec": 1795964000, "summary": "APIBAN lists none", "checked": ["8.8.8.8"]},
        "8.8.8.8": {"listed": False, "seen": {"methods": {"OPTIONS": 2}}, "source": "mirror"},
    }
    assert tab_lines(answer) == [
        "8.8.8.8 :",
        "  listed : false",
        "  seen :",
        "    methods :",
        "      OPTIONS : 2",
        '  source : "mirror"',
        "call@x :",
        "  checked :",
        '    0 : "8.8.8.8"',
        '  summary : "APIBAN lists none"',
        "  t_sec : 1795964000",
        # homer-ui sets answer.data = answer; the viewer shows the self-reference.
        f"data : {SELF_REFERENCE}",
    ]


def test_empty_containers_show_as_the_viewer_writes_them() -> None:
    assert tab_lines({"a": {}, "b": [], "c": None}) == [
        "a : Object",
        "b : Array[0]",
        "c : null",
        f"data : {SELF_REFERENCE}",
    ]
