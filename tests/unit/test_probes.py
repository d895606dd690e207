"""The readiness decision (pure) and the queue counts read from a management API answer."""

from __future__ import annotations

from runherd import rabbit_admin
from runherd.probes import Observation, not_ready


def obs(**kw: object) -> Observation:
    base: dict[str, object] = {
        "service": "launcher#0",
        "broker_connected": True,
        "database_ok": True,
        "consuming": True,
        "queue": "runherd.launcher.commands",
    }
    return Observation(**{**base, **kw})  # type: ignore[arg-type]


def test_ready_only_when_every_replica_is_connected_and_consuming() -> None:
    assert not_ready([obs(), obs(service="monitor#1")], started=True) == []
    assert not_ready([], started=False) == ["starting: services not connected yet"]
    assert not_ready([obs(broker_connected=False, consuming=False)], started=True) == [
        "launcher#0: not connected to RabbitMQ"
    ]
    assert not_ready([obs(consuming=False)], started=True) == ["launcher#0: not consuming runherd.launcher.commands"]
    assert not_ready([obs(database_ok=False, database_error="ConnectionRefusedError()")], started=True) == [
        "launcher#0: PostgreSQL unreachable (ConnectionRefusedError())"
    ]


def test_management_endpoint_from_the_amqp_url() -> None:
    e = rabbit_admin.endpoint("amqp://u:p%40ss@rabbit:5672/prod%2Fa")
    assert (e.base, e.user, e.password, e.vhost) == ("http://rabbit:15672", "u", "p@ss", "prod/a")
    assert rabbit_admin.endpoint("amqps://u:p@rabbit/").base == "https://rabbit:15672"
    assert rabbit_admin.endpoint("amqp://u:p@rabbit").vhost == "/"
    e = rabbit_admin.endpoint("amqp://u:p@rabbit/", "https://admin:pw@mgmt.example.com:443/rabbitmq/")
    assert (e.base, e.user, e.password) == ("https://mgmt.example.com:443/rabbitmq", "admin", "pw")


def test_queue_counts_add_unacked_to_ready() -> None:
    payload = [
        {"name": "runherd.launcher.commands", "messages_ready": 162, "messages_unacknowledged": 100},
        {"name": "runherd.dead-letters"},  # no stats yet
        {"name": "someone.else", "messages_ready": 5},
    ]
    counts = rabbit_admin.parse_queues(payload, {"runherd.launcher.commands", "runherd.dead-letters"})
    assert counts["runherd.launcher.commands"].depth == 262
    assert counts["runherd.dead-letters"].depth == 0
    assert "someone.else" not in counts
    assert rabbit_admin.parse_queues({"error": "x"}, {"a"}) == {}


def test_each_collection_is_timed_by_generation_until_the_hook_is_removed() -> None:
    import gc

    from runherd.probes import watch_gc_pauses

    seen: list[tuple[str, float]] = []
    remove = watch_gc_pauses(observe=lambda generation, seconds: seen.append((generation, seconds)))
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        remove()
    assert [g for g, _ in seen][-2:] == ["2", "0"]
    assert all(s >= 0 for _, s in seen)
    before = len(seen)
    gc.collect()
    assert len(seen) == before, "the hook is gone once removed"
    remove()  # twice is harmless
