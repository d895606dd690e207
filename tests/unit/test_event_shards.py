"""Sharded event ingest: the shard rule (contract), the replicas' assignment (rendezvous hashing),
the config key and the plan field (README "Sharded event ingest")."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest

from runherd import config as config_mod
from runherd.contract import event_shard
from runherd.errors import ConfigError
from runherd.plan import Plan, from_json
from runherd.sharding import assigned, owner

RUN = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def test_the_shard_rule_is_sha256_of_the_run_id_mod_n_as_documented() -> None:
    # int.from_bytes(sha256(run_id)[:8], "big") = 16528805523460263320
    assert event_shard(RUN, 4) == 16528805523460263320 % 4 == 0
    assert event_shard(RUN, 16) == 16528805523460263320 % 16 == 8
    assert event_shard(RUN.upper(), 16) == 8  # the canonical (lowercase) text
    assert event_shard(RUN, 1) == 0


def test_runs_spread_evenly_over_the_shards() -> None:
    counts = Counter(event_shard(str(uuid.uuid4()), 4) for _ in range(4000))
    assert set(counts) == {0, 1, 2, 3}
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_every_shard_has_exactly_one_owner_among_the_live_replicas() -> None:
    replicas = ["a", "b", "c"]
    shares = [assigned(r, replicas, 16) for r in replicas]
    assert frozenset().union(*shares) == frozenset(range(16))
    assert sum(len(s) for s in shares) == 16  # disjoint
    assert all(shares), "16 shards over 3 replicas: each gets some"
    assert all(owner(s, replicas) == r for r, share in zip(replicas, shares, strict=True) for s in share)


def test_a_replica_leaving_moves_only_its_own_shards_and_joining_takes_only_some() -> None:
    before = {r: assigned(r, ["a", "b", "c"], 32) for r in "abc"}
    after = {r: assigned(r, ["a", "b"], 32) for r in "ab"}
    for r in "ab":
        assert before[r] <= after[r]  # nothing moved between survivors
    assert after["a"] | after["b"] == frozenset(range(32))
    joined = {r: assigned(r, ["a", "b", "c", "d"], 32) for r in "abcd"}
    for r in "abc":
        assert joined[r] <= before[r]  # the newcomer takes shards, nobody else swaps
    assert joined["d"]


def test_a_replica_alone_or_missing_from_the_list_counts_itself() -> None:
    assert assigned("me", [], 4) == frozenset(range(4))
    assert assigned("me", ["other"], 8) == assigned("me", ["me", "other"], 8)


def test_event_shards_is_opt_in_and_checked() -> None:
    assert config_mod.from_mapping({}).event_shards == 1
    assert config_mod.from_mapping({"event_shards": 4}).event_shards == 4
    for bad in (0, 257, "4", True):
        with pytest.raises(ConfigError, match="event_shards"):
            config_mod.from_mapping({"event_shards": bad})


def test_the_plan_carries_the_shard_count_only_when_sharded() -> None:
    plain = Plan(run_id=RUN, attempt=1, job="j", steps=())
    assert "event_shards" not in plain.to_json()
    assert from_json(plain.to_json()).event_shards == 1
    sharded = Plan(run_id=RUN, attempt=1, job="j", steps=(), event_shards=4)
    assert from_json(sharded.to_json()).event_shards == 4
