"""The fault suite of issue 8: real faults under a load of at least 100 runs, then the invariants.

    .venv/bin/python -m pytest -q -s -m faults tests/faults

Each scenario starts the three services as OS processes against a private PostgreSQL cluster
(pgcluster.py: initdb/pg_ctl as the postgres user, a free port, never the machine's own) and a
private vhost, each service behind its own TCP proxy to RabbitMQ (tests/proxy.py), publishes the
load (load.py), injects its fault, waits (bounded) for the load to finish and checks the invariants
(invariants.py). Each test prints its report: the load, the fault, the counts of every invariant
(0 is the promise) and a few examples of each violation.
"""
