"""Kafka consumers: `events` (consumer group, into Redis), `items` and `models` (every replica reads all)."""
