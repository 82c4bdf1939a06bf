"""Redis probe: exact queue depth the way kombu lays queues out in Redis.

kombu stores a queue as one list per priority step (`queue` for step 0,
`queue<sep><step>` for the others), LPUSHes new messages and BRPOPs from the
right, keeps unacknowledged messages in one hash for all queues, and deletes
a list when it empties. Counting only `queue` misses every prioritised
message, so depth here is the sum over every step, and a missing key is 0.

The hot path is one pipelined round trip however many queues there are:
one EVALSHA of a small read-only Lua script that does LLEN and LINDEX -1
(the next message to be consumed) for every sub-queue and returns, per
queue, the summed depth and the heads that carry the due header; then HLEN
of the unacked hash and INFO memory. Why a script: packing 8000 commands and
parsing 8000 replies cost most of the ~70 ms a cycle took at 1000 queues x 4
steps; one command with 4000 keys costs a fraction of that. Where scripting
is refused (ACL without EVALSHA, a proxy that blocks it) the probe falls
back, once and for good, to the plain pipeline of LLEN and LINDEX per
sub-queue, with the same results.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_signal_exporter.headers import DUE_HEADER
from celery_signal_exporter.probes import register
from celery_signal_exporter.probes.base import (
    OLDEST_AGE,
    BrokerSnapshot,
    NodeStats,
    ProbeError,
    ProbeKind,
    ProbeOptions,
    QueueStats,
)
from celery_signal_exporter.redact import redact_url, scrub, split_credentials

# redis-py (and kombu's URL parser) are imported where they are used, so
# listing the probes (the CLI does, for --help) loads no broker client.
if TYPE_CHECKING:
    import redis
    from redis.sentinel import Sentinel

#: The options only this probe reads; `serve` offers them (see `register` below).
OPTIONS = (OLDEST_AGE,)


@dataclass(frozen=True)
class RedisSettings:
    """What only the Redis probe reads (ProbeOptions.settings)."""

    #: Read the head message of every list for the oldest-age metric.
    read_oldest_age: bool = True

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> RedisSettings:
        return cls(read_oldest_age=bool(values["oldest_age"]))

DEFAULT_SEP = "\x06\x16"
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
DEFAULT_UNACKED_KEY = "unacked"
BINDING_PREFIX = "_kombu.binding."
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

#: KEYS: every sub-queue list; ARGV[1]: lists per queue; ARGV[2]: "1" to
#: read ages. Returns per queue its depth, then (ages on) one entry per list:
#: the head message (LINDEX -1, the next to be consumed) when it contains
#: the due header's key, else false. The script only counts and filters, in
#: C-speed string search; the client decodes the few heads it returns with
#: Python's json, so the broker is never busy parsing messages (decoding
#: 4000 heads with cjson held Redis for ~30 ms a cycle). A key of another
#: type counts as 0 (pcall); any other error is returned as the script's.
SNAPSHOT_SCRIPT = """
local per = tonumber(ARGV[1])
local ages = ARGV[2] == '1'
local out = {}
for q = 0, #KEYS / per - 1 do
  local depth = 0
  local heads = {}
  for i = q * per + 1, q * per + per do
    local n = redis.pcall('LLEN', KEYS[i])
    if type(n) == 'table' then
      if string.find(tostring(n.err), 'WRONGTYPE', 1, true) then n = 0 else return redis.error_reply(n.err) end
    end
    depth = depth + n
    if ages then
      local head = false
      if n > 0 then
        local raw = redis.pcall('LINDEX', KEYS[i], -1)
        if type(raw) == 'string' and string.find(raw, '"csx_due"', 1, true) then head = raw end
      end
      heads[#heads + 1] = head
    end
  end
  out[#out + 1] = depth
  for _, head in ipairs(heads) do out[#out + 1] = head end
end
return out
"""


def _db_index(path: str | None) -> int:
    """kombu's reading of the URL path: '' and '/' mean db 0."""
    if not path or path == "/":
        return 0
    try:
        return int(path.lstrip("/"))
    except ValueError:
        raise ValueError(f"Redis database must be an integer, not {path!r}") from None


def _alternates(url: str) -> list[str]:
    """kombu's `url;url` failover list (sentinels), split only before a scheme."""
    return re.split(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)", url)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def due_time(raw: object) -> float | None:
    """The due header of one raw kombu message, or None for anything else.

    Lists may hold foreign or corrupt data; nothing here may raise.
    """
    if not isinstance(raw, (bytes, str)):
        return None
    try:
        message = json.loads(raw)
    except ValueError:  # also covers UnicodeDecodeError
        return None
    if not isinstance(message, dict):
        return None
    headers = message.get("headers")
    if not isinstance(headers, dict):
        return None
    due = headers.get(DUE_HEADER)
    if isinstance(due, bool) or not isinstance(due, (int, float)) or not math.isfinite(due):
        return None
    return float(due)


def classify(exc: BaseException) -> str:
    """Map a redis-py (or socket) exception to an error reason."""
    import redis

    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return "auth"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return "auth"
    if isinstance(exc, (redis.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, (redis.ConnectionError, OSError)):
        return "connection"
    if isinstance(exc, (redis.RedisError, ValueError)):
        return "protocol"
    return "other"


class RedisProbe:
    """Probe for `redis://`, `rediss://` and kombu's `sentinel://` URLs."""

    def __init__(self, url: str, options: ProbeOptions | None = None) -> None:
        import redis
        from kombu.utils.url import url_to_parts
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        from redis.sentinel import Sentinel

        opts = options or ProbeOptions()
        transport = opts.transport_options
        self.url = url
        self.label = redact_url(url)
        steps = transport.get("priority_steps") or DEFAULT_PRIORITY_STEPS
        self.priority_steps: tuple[int, ...] = tuple(sorted({int(s) for s in steps}))
        self.sep = str(transport.get("sep") or DEFAULT_SEP)
        self.prefix = str(transport.get("global_keyprefix") or "")
        self.unacked_key = self.prefix + str(transport.get("unacked_key") or DEFAULT_UNACKED_KEY)
        self.read_oldest_age = opts.settings_for(RedisSettings).read_oldest_age
        #: False once the server refused the script; then every snapshot pipelines plain commands.
        self._scripted = True
        self._script_sha: str | None = None

        alternates = [split_credentials(u)[0] for u in _alternates(url)]
        _, username, password = split_credentials(_alternates(url)[0])
        first = url_to_parts(alternates[0])
        self.db = _db_index(first.path)
        self.vhost = str(self.db)  # kombu's virtual_host for Redis
        common: dict[str, Any] = {
            "db": self.db,
            "username": username,
            "password": password,
            "socket_timeout": opts.timeout,
            "socket_connect_timeout": opts.timeout,
            # One quick retry heals a pooled connection the server closed;
            # the loop's next cycle is the real retry.
            "retry": Retry(NoBackoff(), 1),
            "client_name": "celery-signal-exporter",
        }
        self._sentinel: Sentinel | None = None
        if first.scheme == "sentinel":
            master = transport.get("master_name")
            if not master:
                raise ValueError("sentinel:// broker URLs need the transport option master_name")
            nodes = [
                (p.hostname or "127.0.0.1", p.port or DEFAULT_SENTINEL_PORT)
                for p in (url_to_parts(u) for u in alternates)
            ]
            sentinel_kwargs = {
                "socket_timeout": opts.timeout,
                "socket_connect_timeout": opts.timeout,
                **dict(transport.get("sentinel_kwargs") or {}),
            }
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                nodes,
                min_other_sentinels=int(transport.get("min_other_sentinels") or 0),
                sentinel_kwargs=sentinel_kwargs,
            )
            self.node = str(master)
            self.client: redis.Redis = self._sentinel.master_for(str(master), **common)  # type: ignore[no-untyped-call]
        else:
            host = first.hostname or "127.0.0.1"
            port = first.port or DEFAULT_PORT
            self.node = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if first.scheme == "rediss":
                common["ssl"] = True
                common.update(_ssl_options(first.query))
            self.client = redis.Redis(host=host, port=port, **common)

    def _keys(self, queue: str) -> list[str]:
        """Every list kombu may hold `queue`'s messages in (see `_q_for_pri`)."""
        base = self.prefix + queue
        return [f"{base}{self.sep}{step}" if step else base for step in self.priority_steps]

    def _error(self, exc: BaseException) -> ProbeError:
        return ProbeError(classify(exc), type(exc).__name__, scrub(str(exc), self.url))

    def discover(self) -> set[str]:
        """Queue names in kombu's binding sets (`_kombu.binding.<exchange>`,
        members `routing_key<sep>pattern<sep>queue`)."""
        import redis

        try:
            match = _glob_escape(self.prefix + BINDING_PREFIX) + "*"
            keys = list(self.client.scan_iter(match=match, count=1000, _type="set"))
            with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.smembers(key)
                tables: list[Any] = pipe.execute()
        except (redis.RedisError, OSError, ValueError) as exc:
            raise self._error(exc) from None
        found: set[str] = set()
        for members in tables:
            for member in members:
                try:
                    text = member.decode() if isinstance(member, bytes) else str(member)
                except UnicodeDecodeError:
                    continue
                fields = text.split(self.sep)
                if len(fields) >= 3 and fields[-1]:
                    found.add(fields[-1])
        return found

    def snapshot(self, queues: set[str]) -> BrokerSnapshot:
        """All queues, all priority sub-queues, unacked and memory: one round trip."""
        names = sorted(queues)
        if self._scripted:
            try:
                return self._snapshot_scripted(names)
            except _ScriptRefused:
                self._scripted = False
            except _ScriptFailed:
                pass
        return self._snapshot_pipelined(names)

    def _snapshot_scripted(self, names: list[str]) -> BrokerSnapshot:
        """The script's per-queue depth and oldest due, plus HLEN and INFO, in one pipeline."""
        import redis

        keys = [key for name in names for key in self._keys(name)]
        args = (len(self.priority_steps), "1" if self.read_oldest_age else "0")
        try:
            for attempt in (1, 2):
                with self.client.pipeline(transaction=False) as pipe:
                    if self._script_sha is None:
                        pipe.script_load(SNAPSHOT_SCRIPT)
                    pipe.evalsha(self._script_sha or _SCRIPT_SHA, len(keys), *keys, *args)
                    pipe.hlen(self.unacked_key)
                    pipe.info("memory")
                    replies: list[Any] = pipe.execute(raise_on_error=False)
                now = time.time()
                if self._script_sha is None:
                    loaded, *replies = replies
                    if isinstance(loaded, Exception):
                        raise loaded
                    self._script_sha = str(loaded.decode() if isinstance(loaded, bytes) else loaded)
                per_queue, unacked, info = replies
                if isinstance(per_queue, redis.exceptions.NoScriptError) and attempt == 1:
                    self._script_sha = None  # SCRIPT FLUSH or a failover: load it again
                    continue
                break
            if _refused(per_queue):
                raise _ScriptRefused()
            if isinstance(per_queue, redis.ResponseError):
                # An error inside the script (a key the ACL denies, say): the plain
                # commands name it exactly, so this cycle asks them instead.
                raise _ScriptFailed()
            for reply in (per_queue, unacked, info):
                if isinstance(reply, Exception):
                    raise reply
        except (_ScriptRefused, _ScriptFailed):
            raise
        except (redis.RedisError, OSError, ValueError) as exc:
            if _refused(exc):
                raise _ScriptRefused() from None
            raise self._error(exc) from None

        stride = 1 + (len(self.priority_steps) if self.read_oldest_age else 0)
        stats = []
        for i, name in enumerate(names):
            depth, *heads = per_queue[i * stride : (i + 1) * stride]
            stats.append(QueueStats(name=name, vhost=self.vhost, length=int(depth),
                                    oldest_message_age_seconds=_oldest_age(heads, now)))
        return self._result(stats, unacked, info)

    def _snapshot_pipelined(self, names: list[str]) -> BrokerSnapshot:
        """Without scripting: LLEN (and LINDEX -1) per sub-queue, HLEN and INFO in one pipeline."""
        import redis

        per_key = 2 if self.read_oldest_age else 1
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    for key in self._keys(name):
                        pipe.llen(key)
                        if self.read_oldest_age:
                            pipe.lindex(key, -1)
                pipe.hlen(self.unacked_key)
                pipe.info("memory")
                replies: list[Any] = pipe.execute(raise_on_error=False)
            now = time.time()
            *per_queue, unacked, info = replies
            for reply in (unacked, info):
                if isinstance(reply, Exception):
                    raise reply
        except (redis.RedisError, OSError, ValueError) as exc:
            raise self._error(exc) from None

        stride = per_key * len(self.priority_steps)
        stats = []
        for i, name in enumerate(names):
            chunk = per_queue[i * stride : (i + 1) * stride]
            lengths = chunk[0::per_key]
            heads = chunk[1::per_key] if self.read_oldest_age else []
            stats.append(
                QueueStats(
                    name=name,
                    vhost=self.vhost,
                    length=sum(self._length(r) for r in lengths),
                    oldest_message_age_seconds=_oldest_age(heads, now),
                )
            )
        return self._result(stats, unacked, info)

    def _result(self, stats: list[QueueStats], unacked: Any, info: Any) -> BrokerSnapshot:
        node = NodeStats(
            node=self.node,
            memory_used_bytes=float(info.get("used_memory", 0)),
            memory_limit_bytes=float(info.get("maxmemory", 0)),
        )
        return BrokerSnapshot(queues=stats, nodes=[node], unacked_total=int(unacked))

    def _length(self, reply: object) -> int:
        """LLEN's answer; a key of another type (WRONGTYPE) is not a queue."""
        import redis

        if isinstance(reply, Exception):
            if isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE"):
                return 0
            raise self._error(reply)
        return int(reply)  # type: ignore[call-overload,no-any-return]

    def close(self) -> None:
        self.client.close()
        if self._sentinel is not None:
            for node in self._sentinel.sentinels:
                node.close()


class _ScriptRefused(Exception):
    """The server will not run scripts for us: fall back to plain commands."""


class _ScriptFailed(Exception):
    """The script ran into an error reply: this cycle uses plain commands to report it."""


_SCRIPT_SHA = hashlib.sha1(SNAPSHOT_SCRIPT.encode()).hexdigest()
_SCRIPT_WORDS = ("script", "eval")
_REFUSALS = ("noperm", "no permissions", "unknown command", "disabled", "not allowed")


def _refused(reply: object) -> bool:
    """An error that means no scripts here, as against a broker that is down or denies a key."""
    import redis

    if isinstance(reply, redis.exceptions.NoScriptError):
        return True  # still missing right after SCRIPT LOAD: a proxy that drops scripts
    if isinstance(reply, redis.ResponseError):  # NoPermissionError is one
        text = str(reply).lower()
        return any(w in text for w in _SCRIPT_WORDS) and any(r in text for r in _REFUSALS)
    return False


def _oldest_age(heads: Iterable[object], now: float) -> float | None:
    """Age of the longest-waiting head over every priority sub-queue.

    A task not due yet (ETA in the future) counts as age 0.
    """
    due = _oldest_due(list(heads))
    return None if due is None else max(0.0, now - due)


#: The due header's value where it is written the way JSON writes a number.
_DUE_VALUE = re.compile(rb'"csx_due"\s*:\s*(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)\s*[,}]')
_DUE_KEY = b'"csx_due"'


def _oldest_due(heads: list[object]) -> float | None:
    """min(due_time(h) for h in heads), decoding one message instead of all of them.

    Why: json.loads of every head would be most of the client's time at 1000
    queues. Each head's value is read with a regex, and only the smallest is
    confirmed by a real decode. That is exact: a head whose key occurs once
    has either that value in its headers or no due at all, so it cannot hide
    a smaller one; anything else (the key twice, NaN, a non-number, bytes
    that are not a number the regex reads, a confirmation that disagrees)
    decodes every head.
    """
    best: tuple[float, bytes] | None = None
    for head in heads:
        if not isinstance(head, bytes) or _DUE_KEY not in head:
            if isinstance(head, str):
                return _oldest_due_slow(heads)
            continue  # no key, no due (and nothing else here can be a due)
        match = _DUE_VALUE.search(head) if head.count(_DUE_KEY) == 1 else None
        if match is None:
            return _oldest_due_slow(heads)
        value = float(match.group(1))
        if not math.isfinite(value):
            return _oldest_due_slow(heads)
        if best is None or value < best[0]:
            best = (value, head)
    if best is None:
        return None
    if due_time(best[1]) != best[0]:
        return _oldest_due_slow(heads)
    return best[0]


def _oldest_due_slow(heads: Iterable[object]) -> float | None:
    dues = [d for d in (due_time(h) for h in heads) if d is not None]
    return min(dues) if dues else None


def _ssl_options(query: Mapping[str, str]) -> dict[str, Any]:
    """kombu-style `?ssl_cert_reqs=required&ssl_ca_certs=...` for rediss://."""
    out: dict[str, Any] = {}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if query.get(key):
            out[key] = query[key]
    reqs = query.get("ssl_cert_reqs")
    if reqs:
        out["ssl_cert_reqs"] = reqs.lower().removeprefix("cert_")
    check = query.get("ssl_check_hostname")
    if check:
        out["ssl_check_hostname"] = check.lower() != "false"
    return out


register(ProbeKind(
    name="redis",
    schemes=("redis", "rediss", "sentinel"),
    create=RedisProbe,
    options=OPTIONS,
    settings=RedisSettings.from_options,
))
