"""PostgreSQL state: schema, migrations, named queries and the Store (the one asyncpg user)."""

from shared.store.migrate import migrate
from shared.store.store import LaunchClaim, RunRef, Store, StoreError, Transitioned, Tx

__all__ = ["LaunchClaim", "RunRef", "Store", "StoreError", "Transitioned", "Tx", "migrate"]
