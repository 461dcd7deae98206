"""Online state: the store interface (`base`), its Redis and in-memory implementations, the packed layout
and the pure state transitions the consumers apply."""
from serving.state.base import IngestResult, IngestWrite, ItemStats, OnlineStore
from serving.state.codec import CounterLog, UserAttrs, UserRecord

__all__ = ["CounterLog", "IngestResult", "IngestWrite", "ItemStats", "OnlineStore", "UserAttrs", "UserRecord"]
