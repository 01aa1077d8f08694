"""Sessions: their state, the stores that keep it between calls, and signed tokens of it.

- `state`: `SessionState` and its compact binary form (about 1 KiB for the book model);
- `store`: the `SessionStore` interface of plain verbs (get, put, delete, touch, len,
  lock...), which knows nothing of HTTP;
- `memory`, `redis_store`: the two stores; `backends.create_store` picks one by name;
- `background`: renewing the locks of running generations, sweeping expired sessions;
- `portable`: signed session state that clients keep or move between servers.

A generation holds its session's lock, a lease that lapses unless renewed (so a crashed
replica frees the session within one lease). Two guards keep a lease that lapsed from
letting two replicas generate on one session: `refresh_locks_forever` stops a generation
before its lease can lapse, and the generation's final write is `put_locked`, which
writes only while the lock still holds this process's token.
"""

from service.sessions.backends import create_store
from service.sessions.background import refresh_locks_forever, sweep_forever
from service.sessions.memory import MemorySessionStore
from service.sessions.redis_store import RedisSessionStore
from service.sessions.state import NO_TOKEN, SessionState, new_session_id
from service.sessions.store import EvictionHook, SessionStore

__all__ = [
    "NO_TOKEN",
    "EvictionHook",
    "MemorySessionStore",
    "RedisSessionStore",
    "SessionState",
    "SessionStore",
    "create_store",
    "new_session_id",
    "refresh_locks_forever",
    "sweep_forever",
]
