"""Which events a decoded row change becomes: full rows, unchanged TOAST, primary-key changes."""

import pytest

from cdc.events.build import UNCHANGED, KeyNotSent, delete_events, insert_events, update_events

KEY = ("id",)


def test_insert_is_one_create_keyed_by_the_primary_key():
    (event,) = insert_events({"id": 1, "name": "a"}, KEY)
    assert (event.op, event.before, event.after, event.key, event.unchanged) == ("c", None, {"id": 1, "name": "a"}, {"id": 1}, ())


def test_update_takes_unchanged_toast_from_the_full_before_image():
    old = {"id": 1, "notes": "long text", "n": 1}
    (event,) = update_events({"id": 1, "notes": UNCHANGED, "n": 2}, old, KEY)
    assert event.op == "u"
    assert event.after == {"id": 1, "notes": "long text", "n": 2}
    assert event.before == old
    assert event.unchanged == ()


def test_update_without_a_before_image_lists_the_unchanged_columns_and_leaves_them_out():
    (event,) = update_events({"id": 1, "notes": UNCHANGED, "doc": UNCHANGED, "n": 2}, None, KEY)
    assert event.op == "u"
    assert event.after == {"id": 1, "n": 2}
    assert event.unchanged == ("notes", "doc")
    assert event.before is None


def test_primary_key_change_is_a_delete_then_a_create():
    old = {"id": 1, "n": 1}
    d, c = update_events({"id": 2, "n": 1}, old, KEY)
    assert (d.op, d.key, d.before, d.after) == ("d", {"id": 1}, old, None)
    assert (c.op, c.key, c.before, c.after) == ("c", {"id": 2}, None, {"id": 2, "n": 1})


def test_primary_key_change_with_only_the_old_key_sent():
    d, c = update_events({"id": 2, "n": 5}, {"id": 1}, KEY)
    assert (d.op, d.before, c.op, c.after) == ("d", {"id": 1}, "c", {"id": 2, "n": 5})


def test_primary_key_change_with_a_value_not_resent_stays_one_update_that_moves_the_row():
    (event,) = update_events({"id": 2, "notes": UNCHANGED}, {"id": 1}, KEY)
    assert (event.op, event.before, event.after, event.key, event.unchanged) == (
        "u", {"id": 1}, {"id": 2}, {"id": 2}, ("notes",))


def test_a_key_column_that_was_not_resent_and_is_in_no_before_image_is_an_error():
    with pytest.raises(KeyNotSent) as err:
        update_events({"id": UNCHANGED, "n": 1}, None, KEY)
    assert err.value.columns == ["id"]


def test_delete_before_is_the_full_row_or_the_key():
    (full,) = delete_events({"id": 1, "n": 2}, True, KEY)
    (key_only,) = delete_events({"id": 1, "n": None}, False, KEY)
    assert full.before == {"id": 1, "n": 2} and full.key == {"id": 1} and full.after is None
    assert key_only.before == {"id": 1}
