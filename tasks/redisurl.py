"""What ``MODELBAY_REDIS_URL`` names: one Redis/Valkey, or a Sentinel-managed master.

Two forms, both Celery's and kombu's conventions:

- ``redis://[[user]:password@]host[:port][/db]`` (also ``rediss://``, ``unix://``): one
  server, as redis-py's ``from_url`` reads it;
- ``sentinel://[[user]:password@]host[:port][/db];sentinel://host2[:port];...``: the
  Sentinels (port 26379 by default) that know the master named by
  ``MODELBAY_REDIS_SENTINEL_MASTER``. As in kombu, a password (and user) in the *first*
  entry is the data nodes' (master and replicas), not the Sentinels'; the data nodes' may
  instead come from ``MODELBAY_REDIS_PASSWORD``, the Sentinels' from
  ``MODELBAY_REDIS_SENTINEL_PASSWORD``. The db may be given on any entry; all that give it agree.

Pure parsing, no Redis and no settings import (:mod:`tasks.settings` checks with it, and
:mod:`tasks.redisconn` makes the clients).
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

SENTINEL_PORT = 26379
PLAIN_SCHEMES = ("redis", "rediss", "unix")


class RedisUrlError(ValueError):
    """A Redis URL or Sentinel setting that cannot work; ``problems`` has one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is. ``sentinels`` empty: one server at ``url``."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None           # the data nodes' (master and replicas)
    sentinel_password: str | None = None  # the Sentinels' own (their requirepass)

    @property
    def sentinel(self) -> bool:
        return bool(self.sentinels)

    def broker_url(self) -> str:
        """The URL for Celery/kombu: the plain URL as given, or every Sentinel as a
        ``sentinel://`` entry with the data nodes' credentials and db on the first."""
        if not self.sentinel:
            return self.url
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        entries = [f"sentinel://{host}:{port}" for host, port in self.sentinels]
        entries[0] = f"sentinel://{auth}{self.sentinels[0][0]}:{self.sentinels[0][1]}/{self.db}"
        return ";".join(entries)


def parse_redis_target(url: str, master: str = "", password: str = "", sentinel_password: str = "") -> RedisTarget:
    """The :class:`RedisTarget` these settings name (env names in the messages).

    Raises :class:`RedisUrlError` listing every problem."""
    url = url.strip()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme != "sentinel":
        problems = []
        if scheme not in PLAIN_SCHEMES:
            problems.append(f"MODELBAY_REDIS_URL={url!r}: expected redis://, rediss://, unix:// or "
                            "sentinel://host:port;sentinel://host2:port")
        elif ";" in url:
            problems.append(f"MODELBAY_REDIS_URL={url!r}: several servers are only possible as sentinel:// entries")
        for name, value in (("MODELBAY_REDIS_SENTINEL_MASTER", master), ("MODELBAY_REDIS_PASSWORD", password),
                            ("MODELBAY_REDIS_SENTINEL_PASSWORD", sentinel_password)):
            if value:
                problems.append(f"{name} is only for a sentinel:// MODELBAY_REDIS_URL (a redis:// URL carries "
                                "its password itself)")
        if problems:
            raise RedisUrlError(problems)
        return RedisTarget(url=url)
    return _parse_sentinel(url, master.strip(), password, sentinel_password)


def _parse_sentinel(url: str, master: str, password: str, sentinel_password: str) -> RedisTarget:
    problems: list[str] = []
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    user: str | None = None
    url_password: str | None = None
    for i, entry in enumerate(e.strip() for e in url.split(";")):
        parsed = _entry(entry, problems)
        if parsed is None:
            continue
        host, port, db, entry_user, entry_password = parsed
        sentinels.append((host, port))
        if db is not None:
            dbs.add(db)
        if i == 0:
            user, url_password = entry_user, entry_password
        elif entry_password is not None:
            problems.append(f"sentinel entry {entry!r}: a password belongs on the first entry only (it is the "
                            "data nodes'); the Sentinels' is MODELBAY_REDIS_SENTINEL_PASSWORD")
    if not master:
        problems.append("MODELBAY_REDIS_SENTINEL_MASTER is required with a sentinel:// MODELBAY_REDIS_URL "
                        "(the master name the Sentinels monitor)")
    if len(dbs) > 1:
        problems.append(f"MODELBAY_REDIS_URL={url!r}: the sentinel entries name different dbs {sorted(dbs)}")
    if password and url_password is not None and password != url_password:
        problems.append("the data nodes' password is given twice and differently (in MODELBAY_REDIS_URL and "
                        "MODELBAY_REDIS_PASSWORD)")
    if problems:
        raise RedisUrlError(problems)
    return RedisTarget(url=url, sentinels=tuple(sentinels), master=master, db=dbs.pop() if dbs else 0,
                       username=user, password=password or url_password,
                       sentinel_password=sentinel_password or None)


def _entry(entry: str, problems: list[str]) -> tuple[str, int, int | None, str | None, str | None] | None:
    """host, port, db (None: not given), user, password of one ``sentinel://`` entry."""
    if not entry.lower().startswith("sentinel://"):
        problems.append(f"sentinel entry {entry!r}: every entry must be sentinel://host[:port] (no redis:// "
                        "mixed in)")
        return None
    split = urlsplit(entry)
    try:
        port = split.port or SENTINEL_PORT
    except ValueError:
        problems.append(f"sentinel entry {entry!r}: the port is not a number from 1 to 65535")
        return None
    if not split.hostname:
        problems.append(f"sentinel entry {entry!r}: no host")
        return None
    path = split.path.strip("/")
    if path and not path.isdigit():
        problems.append(f"sentinel entry {entry!r}: the db must be a number (got {path!r})")
        return None
    user = unquote(split.username) if split.username else None
    password = unquote(split.password) if split.password is not None else None
    return split.hostname, port, int(path) if path else None, user, password
