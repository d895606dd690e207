"""PostgreSQL state: schema, migrations, named queries and the Store (the one asyncpg user)."""

from runherd.store.migrate import migrate
from runherd.store.store import LaunchClaim, RunRef, Store, StoreError, Transitioned, Tx

__all__ = ["LaunchClaim", "RunRef", "Store", "StoreError", "Transitioned", "Tx", "migrate"]
