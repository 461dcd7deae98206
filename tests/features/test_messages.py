import pytest

from features.messages import MessageError, ModelAnnouncement, decode_event, decode_item, encode_event, encode_item
from features.schema import Event, Item


def test_event_round_trip():
    e = Event("e1", 1, 2, 3, "click", 1.0, 2.5, {"a": "b"})
    assert decode_event(encode_event(e)) == e


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xff\xfe", "not_json"),
        (b"[1,2]", "not_object"),
        (b'{"event_id":"e"}', "missing_field"),
        (b'{"event_id":"e","user_id":1,"item_id":2,"ts_ms":3,"event_type":"click","label":1,"zzz":1}', "unknown_field"),
        (b'{"event_id":"e","user_id":"1","item_id":2,"ts_ms":3,"event_type":"click","label":1}', "invalid_field"),
        (b"{" + b" " * 70000 + b"}", "too_large"),
    ],
)
def test_bad_event_messages_carry_a_reason(raw, reason):
    with pytest.raises(MessageError) as ei:
        decode_event(raw)
    assert ei.value.reason == reason


def test_item_and_model_messages():
    it = Item(5, "t", ("c",), (), {}, {})
    assert decode_item(encode_item(it)).categories == ("c",)
    m = ModelAnnouncement("v1", "file:///x", "ab" * 32)
    assert ModelAnnouncement.decode(m.encode()) == m
    with pytest.raises(MessageError, match="model.checksum"):
        ModelAnnouncement.decode(b'{"version":"v","uri":"u","checksum":""}')
    with pytest.raises(MessageError, match="model.checksum must be the manifest's sha256"):
        ModelAnnouncement.decode(b'{"version":"v","uri":"u","checksum":"abc"}')
