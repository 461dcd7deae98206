"""Services lifecycle: up -> real Kafka producer/consumer-group round trip + Redis SET/GET -> down."""
import time

import pytest

from jobs.cli import main
from jobs.services import ServicesState, pid_alive


@pytest.mark.integration
def test_services_up_round_trip_down(tmp_path, capsys):
    state = tmp_path / "state"
    assert main(["services", "up", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    st = ServicesState.load(state)
    try:
        assert f"kafka   {st.kafka.address}" in out and f"redis   {st.redis.address}" in out
        assert st.kafka.address.startswith("127.0.0.1:") and st.redis.address.startswith("redis://127.0.0.1:")
        assert main(["services", "status", "--state-dir", str(state)]) == 0

        import redis
        r = redis.Redis.from_url(st.redis.address)
        r.set("cascade:test", b"v1")
        assert r.get("cascade:test") == b"v1"
        r.close()

        from kafka import KafkaConsumer, KafkaProducer
        prod = KafkaProducer(bootstrap_servers=st.kafka.address)
        for i in range(10):
            prod.send("roundtrip", key=b"k", value=f"m{i}".encode())
        prod.flush()
        prod.close()
        cons = KafkaConsumer("roundtrip", bootstrap_servers=st.kafka.address, group_id="g1",
                             auto_offset_reset="earliest", session_timeout_ms=2000, heartbeat_interval_ms=200,
                             consumer_timeout_ms=15000)
        got = []
        for msg in cons:
            got.append(msg.value.decode())
            if len(got) == 10:
                break
        cons.commit()
        cons.close()
        assert got == [f"m{i}" for i in range(10)]
    finally:
        assert main(["services", "down", "--state-dir", str(state)]) == 0
    time.sleep(0.1)
    assert not pid_alive(st.kafka.pid) and not pid_alive(st.redis.pid)
    assert not (state / "services.json").exists()
    assert main(["services", "status", "--state-dir", str(state)]) == 1


def test_missing_redis_binary_gives_the_fix(monkeypatch):
    import jobs.services as s
    monkeypatch.setattr(s.shutil, "which", lambda name: None)
    with pytest.raises(s.ServiceError, match="apt-get install redis-server"):
        s.redis_binary()
