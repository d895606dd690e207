"""Canaries: pure parts of services/runherd/heartbeat/watermark.py."""

from __future__ import annotations

import orjson
import pytest

from runherd.contract import parse_heartbeat
from runherd.heartbeat.watermark import CANARY_RUN_ID, canary_body, next_pause


def test_a_canary_is_a_valid_heartbeat_of_the_nil_run_carrying_its_nonce() -> None:
    beat = parse_heartbeat(orjson.loads(canary_body(2**31 - 1)))
    assert beat.run_id == CANARY_RUN_ID == "00000000-0000-0000-0000-000000000000"
    assert beat.attempt == 2**31 - 1


@pytest.mark.parametrize(("rand", "pause"), [(0.0, 0.75), (0.5, 1.0), (0.999, 1.2495)])
def test_canary_pauses_are_jittered_around_the_period(rand: float, pause: float) -> None:
    assert next_pause(1.0, rand) == pytest.approx(pause)
