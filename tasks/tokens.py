"""The token stream of a streaming job: worker → Redis Stream → any web replica.

Key ``mb:tok:<job id>``: a Redis Stream whose entries are ``{"t": text}`` (a generated piece)
and a last ``{"end": "1"}`` once the generation stopped for any reason. A stream keeps its
entries, so a reader that subscribes late (another replica, a slow first poll) still gets
every piece in order; it expires ``ttl_s`` seconds after its last write.

Only jobs created with ``stream=True`` (the OpenAI-compatible ``stream: true`` routes) write
one; the job record stays the truth for the final status, text and usage.
"""
from __future__ import annotations

from dataclasses import dataclass

import redis

from tasks.keys import stream_key
from tasks.redisconn import BLOCK_MAX_S


@dataclass(frozen=True)
class Read:
    """What one :meth:`TokenStream.read` returned: pieces in order, the id to read after
    next time, and whether the end marker was among them."""

    pieces: list[str]
    last_id: str
    ended: bool


class TokenStream:
    """Writer (worker) and reader (web) of the per-job token streams."""

    def __init__(self, client: redis.Redis, ttl_s: int = 3600) -> None:
        self._r = client
        self.ttl_s = ttl_s

    def append(self, job_id: str, text: str) -> None:
        key = stream_key(job_id)
        with self._r.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"t": text})
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def end(self, job_id: str) -> None:
        key = stream_key(job_id)
        with self._r.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"end": "1"})
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def read(self, job_id: str, after: str = "0", block_s: float = 0.0) -> Read:
        """Entries after id ``after``, waiting up to ``block_s`` seconds for the first one
        (0: do not wait; at most :data:`tasks.redisconn.BLOCK_MAX_S`, under the reply timeout)."""
        block = int(min(block_s, BLOCK_MAX_S) * 1000) if block_s > 0 else None
        reply = self._r.xread({stream_key(job_id): after}, block=block, count=512)
        pieces: list[str] = []
        ended = False
        last = after
        for _key, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                data = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
                if "end" in data:
                    ended = True
                elif "t" in data:
                    value = data["t"]
                    pieces.append(value.decode() if isinstance(value, bytes) else value)
        return Read(pieces, last, ended)
