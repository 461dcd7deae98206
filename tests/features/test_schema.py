import math

import pyarrow.parquet as pq
import pytest

from features.schema import (
    Event, EventType, Item, SchemaError, User, check_table_schema, records_to_table, table_to_records,
    validate_event, validate_item,
)


def _event(**kw):
    base = dict(event_id="e1", user_id=1, item_id=2, ts_ms=1000, event_type="click", label=1.0, value=math.nan,
                context={"surface": "home"})
    base.update(kw)
    return Event(**base)


def test_event_parquet_round_trip(tmp_path):
    events = [_event(), _event(event_id="e2", value=4.5, context={}), _event(event_id="e3", event_type="purchase", value=19.99)]
    t = records_to_table(events, "events")
    pq.write_table(t, tmp_path / "e.parquet")
    back = table_to_records(pq.read_table(tmp_path / "e.parquet"), "events")
    assert [b.event_id for b in back] == ["e1", "e2", "e3"]
    assert math.isnan(back[0].value) and back[1].value == 4.5
    assert dict(back[0].context) == {"surface": "home"}
    assert back[2].event_type == "purchase"
    check_table_schema(pq.read_table(tmp_path / "e.parquet"), "events")


def test_item_and_user_round_trip():
    items = [Item(item_id=7, title="t", categories=("Comedy", "Drama"), tags=("x",), attributes={"year": "1995"},
                  numeric={"year": 1995.0})]
    back = table_to_records(records_to_table(items, "items"), "items")
    assert back[0].categories == ("Comedy", "Drama") and back[0].numeric == {"year": 1995.0}
    users = [User(user_id=3, attributes={"gender": "F"}, numeric={"age": 25.0})]
    assert table_to_records(records_to_table(users, "users"), "users")[0].attributes == {"gender": "F"}


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(event_id=""), "event.event_id"),
        (dict(user_id="12"), "event.user_id must be an int64"),
        (dict(item_id=2**64), "event.item_id=.* outside the int64 range"),
        (dict(ts_ms=-5), "event.ts_ms=-5 is negative"),
        (dict(event_type="teleport"), "event.event_type 'teleport' is not one of"),
        (dict(label=math.inf), "event.label must be finite"),
        (dict(context={"a": 1}), r"event.context\['a'\]"),
    ],
)
def test_validate_event_names_the_field(kw, match):
    with pytest.raises(SchemaError, match=match):
        validate_event(_event(**kw))


def test_validate_item_rejects_empty_category():
    with pytest.raises(SchemaError, match=r"item.categories\[1\]"):
        validate_item(Item(item_id=1, categories=("a", "")))


def test_event_type_codes_are_stable():
    # Codes are stored in sequences: renumbering would corrupt every stored history.
    assert [(e.name, e.value) for e in EventType][:5] == [
        ("IMPRESSION", 1), ("CLICK", 2), ("PURCHASE", 3), ("RATING", 4), ("INTERACTION", 5)]


def test_check_table_schema_reports_missing_column():
    t = records_to_table([_event()], "events").drop(["label"])
    with pytest.raises(SchemaError, match="column 'label' is missing"):
        check_table_schema(t, "events", "x.parquet")
