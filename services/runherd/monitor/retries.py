"""The monitor's retry rule: each failed run gets one retry decision, and a retry run if it has
retries left (shared/rules/retries.py decides; shared/store/retries.py claims and records).

Claim, decide and record happen in one transaction with the failed runs locked (SKIP LOCKED), so
any number of monitor replicas retry each failed run at most once.
"""

from __future__ import annotations

import logging

from runherd import metrics
from runherd.config import RunRetries
from runherd.rules.retries import decide, retry_tags
from runherd.store import Store
from runherd.store import retries as retry_store
from runherd.store.retries import FailedRun, Retry

log = logging.getLogger("runherd.monitor.retries")


def plan(failed: FailedRun, config: RunRetries) -> Retry:
    """The decision for one failed run, as the record to write."""
    decision = decide(failed.tags, failed.failure_kind, failed.retry_number, config)
    if not decision.retry:
        # Runs with no retries configured are decided silently: only a refused retry is news.
        return Retry(origin=failed, message=decision.reason, log=decision.max_retries > 0)
    new_id = Retry.new_id()
    tags = retry_tags(
        failed.tags, retry_number=decision.retry_number, parent_run_id=failed.run_id, root_run_id=failed.root_run_id
    )
    return Retry(
        origin=failed,
        message=f"{decision.reason}: run {new_id}",
        retry_run_id=new_id,
        retry_number=decision.retry_number,
        strategy=decision.strategy.value,
        delay_seconds=decision.delay_seconds,
        tags=tags,
    )


async def retry_failed_runs(store: Store, config: RunRetries, batch: int) -> int:
    """One sweep: decide every failed run not decided yet; returns how many retry runs were queued."""
    async with store.tx() as tx:
        failed = await retry_store.claim_failed(tx, batch)
        if not failed:
            return 0
        recorded = await retry_store.record(tx, [plan(f, config) for f in failed])
    queued = {origin: new for origin, new in recorded.items() if new}
    for origin, new in queued.items():
        log.info("retrying run_id=%s as run_id=%s", origin, new)
    if queued:
        metrics.MONITOR_ACTIONS.labels("retry").inc(len(queued))
    return len(queued)
