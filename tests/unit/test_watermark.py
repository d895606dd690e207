"""Canaries: the pure parts of services/runherd/heartbeat/watermark.py and monitor/watermark.py."""

from __future__ import annotations

import orjson
import pytest

from runherd.broker import Delivery
from runherd.contract import parse_heartbeat
from runherd.heartbeat.watermark import CANARY_RUN_ID, canary_body, next_pause
from runherd.monitor.watermark import CANARY_KEY, split_canaries
from runherd.monitor.watermark import canary_body as event_canary_body


def test_a_canary_is_a_valid_heartbeat_of_the_nil_run_carrying_its_nonce() -> None:
    beat = parse_heartbeat(orjson.loads(canary_body(2**31 - 1)))
    assert beat.run_id == CANARY_RUN_ID == "00000000-0000-0000-0000-000000000000"
    assert beat.attempt == 2**31 - 1


@pytest.mark.parametrize(("rand", "pause"), [(0.0, 0.75), (0.5, 1.0), (0.999, 1.2495)])
def test_canary_pauses_are_jittered_around_the_period(rand: float, pause: float) -> None:
    assert next_pause(1.0, rand) == pytest.approx(pause)


def _delivery(routing_key: str, body: bytes) -> Delivery:
    return Delivery(body, routing_key, {}, None)  # type: ignore[arg-type]


def test_event_canaries_are_told_from_events_by_routing_key_and_a_valid_nonce() -> None:
    canary = _delivery(CANARY_KEY, event_canary_body(9))
    event = _delivery("run.1b4e28ba-2fa1-11d2-883f-0016d3cca427", b'{"v": 1}')
    forged = _delivery(CANARY_KEY, b'{"v": 1, "canary": "9"}')  # not a nonce: dead-lettered as an event
    zero = _delivery(CANARY_KEY, b'{"v": 1, "canary": 0}')
    events, canaries, nonces = split_canaries([event, canary, forged, zero])
    assert events == [event, forged, zero] and canaries == [canary] and nonces == [9]
