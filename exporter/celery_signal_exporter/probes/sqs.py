"""Amazon SQS probe: the queue attributes SQS keeps, read the way kombu's SQS transport names queues.

SQS counts for us: `GetQueueAttributes` answers a queue's waiting
(`ApproximateNumberOfMessages`), in-flight (`...NotVisible`: received by a
worker, not yet deleted) and delayed (`...Delayed`) messages without
receiving any, so nothing is consumed and no visibility is disturbed. Every
request is billed, so a cycle is bounded: one `GetQueueAttributes` per
queue the loop selected (already capped at `--max-queues`), one more per
dead-letter queue not among them, and a `GetQueueUrl` only for a queue name
not seen before. `ListQueues` (with kombu's `queue_name_prefix`) runs in
`discover()`, every few cycles, not in the hot path; with kombu's
`predefined_queues` the probe lists nothing and uses their URLs.

What SQS cannot say: consumers (a receiver is just a caller) and the head
message's age (only a receive could read `SentTimestamp`, and it would hide
the message from workers), so those series are absent.
"""

from __future__ import annotations

import json
import string
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_signal_exporter import catalogue as c
from celery_signal_exporter.probes import register
from celery_signal_exporter.probes.base import (
    BrokerSnapshot,
    ProbeError,
    ProbeKind,
    ProbeOptions,
    QueueStats,
)
from celery_signal_exporter.redact import redact_url, scrub, split_credentials

# boto3 is imported where it is used, so listing the probes (the CLI does, for --help) loads no
# AWS client.
if TYPE_CHECKING:
    from botocore.client import BaseClient

#: kombu's default region when neither the transport options nor the AWS configuration name one.
DEFAULT_REGION = "us-east-1"
#: The attributes a cycle reads per queue: one request, whatever of them the queue has.
ATTRIBUTES = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
              "ApproximateNumberOfMessagesDelayed", "RedrivePolicy")
#: ListQueues pages (1000 names each) one discovery may read: 10 000 queues, 10 requests at most.
MAX_LIST_PAGES = 10
#: Requests in flight at once: SQS answers each in a few ms, so 1000 queues one by one take seconds.
PARALLEL = 8
#: kombu's name translation (`Channel.entity_name`): '.' becomes '-', other punctuation but '-' and '_'
#: becomes '_', and a `.fifo` suffix is kept.
_ENTITY_TABLE = {ord(c): ord("_") for c in string.punctuation if c not in "-_."}
_ENTITY_TABLE[ord(".")] = ord("-")
#: The `vhost` label: kombu's virtual host of an SQS URL.
VHOST = "/"

_AUTH_CODES = frozenset({
    "AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch",
    "UnrecognizedClientException", "InvalidAccessKeyId", "IncompleteSignature", "MissingAuthenticationToken",
    "ExpiredToken", "ExpiredTokenException", "InvalidSecurity", "AuthFailure", "OptInRequired",
    "RequestExpired", "KMS.AccessDeniedException",
})
_NOT_FOUND_CODES = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})


def entity_name(name: str) -> str:
    """A Celery queue name as kombu's SQS transport names the SQS queue (prefix included by the caller)."""
    if name.endswith(".fifo"):
        return name[: -len(".fifo")].translate(_ENTITY_TABLE) + ".fifo"
    return name.translate(_ENTITY_TABLE)


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def classify(exc: BaseException) -> str:
    """Map a botocore exception to an error reason: auth, timeout, connection, else protocol."""
    from botocore import exceptions as bx

    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError,
                        bx.NoAuthTokenError)):
        return "auth"
    if isinstance(exc, bx.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return "auth" if _code(exc) in _AUTH_CODES or status in (401, 403) else "protocol"
    if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ProxyConnectionError,
                        bx.SSLError, bx.HTTPClientError, OSError)):
        return "connection"
    if isinstance(exc, (bx.ResponseParserError, KeyError, TypeError, ValueError)):
        return "protocol"  # an answer of an unexpected shape (an HTML error page, a redrive policy not JSON)
    return "other"


def _not_found(exc: BaseException) -> bool:
    return _code(exc) in _NOT_FOUND_CODES


@dataclass(frozen=True)
class _Queue:
    """Where one queue lives and which client may read it (predefined queues may carry their own)."""

    url: str
    client_key: tuple[str, str | None]
    #: Named by the configuration (predefined_queues): missing is an error, not a queue deleted meanwhile.
    required: bool = False


class SQSProbe:
    """Probe for `sqs://[key:secret@][host[:port]]`, with kombu's SQS transport options."""

    def __init__(self, url: str, options: ProbeOptions | None = None) -> None:
        import boto3
        from botocore.config import Config

        opts = options or ProbeOptions()
        transport = opts.transport_options
        self.url = url
        self.label = redact_url(url)
        bare, key_id, secret = split_credentials(url)
        rest = bare.split("://", 1)[1] if "://" in bare else ""
        host = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]  # `sqs://@host`: empty credentials
        secure = transport.get("is_secure")
        # kombu: a host in the URL is the endpoint, http unless `is_secure` (SQS-compatible servers).
        self.endpoint = f"{'https' if secure else 'http'}://{host}" if host else None
        session = boto3.Session()
        self.region = str(transport.get("region") or session.region_name or DEFAULT_REGION)
        self.prefix = str(transport.get("queue_name_prefix") or "")
        predefined = transport.get("predefined_queues") or {}
        if not isinstance(predefined, Mapping):
            raise ValueError("the SQS transport option predefined_queues must map queue names to {'url': ...}")
        self._secrets = tuple(s for s in (key_id, secret) if s)
        self._config = Config(
            connect_timeout=opts.timeout, read_timeout=opts.timeout,
            retries={"mode": "standard", "total_max_attempts": 2},  # one retry; the next cycle is the real one
            max_pool_connections=PARALLEL, user_agent_extra="celery-signal-exporter",
        )
        self._lock = threading.Lock()
        self._requests = 0
        self._clients: dict[tuple[str, str | None], BaseClient] = {}
        self._credentials: dict[tuple[str, str | None], tuple[str | None, str | None]] = {}
        default = (self.region, key_id)
        self._credentials[default] = (key_id, secret)
        self._default_key = default
        #: label -> queue; from ListQueues, predefined_queues or GetQueueUrl.
        self._queues: dict[str, _Queue] = {}
        #: Dead-letter queues outside the listing (another prefix or account), by ARN.
        self._dead_letters: dict[str, _Queue] = {}
        #: SQS names GetQueueUrl found missing, until the next discovery (never asked twice in between).
        self._missing: set[str] = set()
        self._predefined = bool(predefined)
        for name, spec in predefined.items():
            if not isinstance(spec, Mapping) or not spec.get("url"):
                raise ValueError(f"predefined SQS queue {name!r} has no 'url'")
            qkey = (str(spec.get("region") or self.region), spec.get("access_key_id") or key_id)
            self._credentials.setdefault(qkey, (qkey[1], spec.get("secret_access_key") or secret))
            if spec.get("secret_access_key"):
                self._secrets += (str(spec["secret_access_key"]), str(qkey[1]))
            self._queues[self._label(str(name))] = _Queue(str(spec["url"]), qkey, required=True)
        self._listed = self._predefined

    # -- clients -------------------------------------------------------------

    def _client(self, key: tuple[str, str | None]) -> BaseClient:
        """One client per (region, access key), made on first use; counting every HTTP attempt."""
        import boto3

        with self._lock:
            client = self._clients.get(key)
            if client is None:
                key_id, secret = self._credentials[key]
                # Without a key in the URL (or the queue's definition) boto3's own chain decides:
                # environment, shared profile, web identity (IRSA), container or instance role.
                client = boto3.Session().client(
                    "sqs", region_name=key[0], endpoint_url=self.endpoint, config=self._config,
                    aws_access_key_id=key_id if key_id and secret else None,
                    aws_secret_access_key=secret if key_id and secret else None,
                )
                client.meta.events.register("before-send.sqs", self._count)
                self._clients[key] = client
            return client

    def _count(self, **_: Any) -> None:
        with self._lock:
            self._requests += 1

    def _error(self, exc: BaseException) -> ProbeError:
        message = scrub(str(exc), self.url, secrets=self._secrets)
        cause = _code(exc) or type(exc).__name__
        return ProbeError(classify(exc), cause, message)

    def _label(self, sqs_name: str) -> str:
        """The queue label: the SQS name without kombu's prefix."""
        return sqs_name[len(self.prefix):] if self.prefix and sqs_name.startswith(self.prefix) else sqs_name

    # -- the Probe protocol --------------------------------------------------

    def discover(self) -> set[str]:
        """Every queue under the prefix (ListQueues, at most MAX_LIST_PAGES pages), or the predefined ones."""
        if not self._predefined:
            self._list()
        return set(self._queues)

    def _list(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client(self._default_key)
        found: dict[str, _Queue] = {}
        token: str | None = None
        try:
            for _ in range(MAX_LIST_PAGES):
                args: dict[str, Any] = {"QueueNamePrefix": self.prefix, "MaxResults": 1000}
                if token:
                    args["NextToken"] = token
                answer = client.list_queues(**args)
                for url in answer.get("QueueUrls", []):
                    found[self._label(str(url).rsplit("/", 1)[-1])] = _Queue(str(url), self._default_key)
                token = answer.get("NextToken")
                if not token:
                    break
        except (BotoCoreError, ClientError, ValueError, KeyError) as exc:
            raise self._error(exc) from None
        self._queues = found
        self._missing.clear()
        self._listed = True

    def snapshot(self, queues: set[str]) -> BrokerSnapshot:
        """One GetQueueAttributes per wanted queue and per dead-letter queue not among them."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if not self._listed:
                self._list()  # `check` calls snapshot() alone: one ListQueues proves endpoint and credentials
            wanted = {name: q for name in sorted(queues) if (q := self._resolve(name)) is not None}
            answers = self._attributes(wanted.values())
            # Dead-letter queues: the target of each redrive policy, read once even when shared.
            targets: dict[str, str] = {}  # source label -> DLQ url
            extra: dict[str, _Queue] = {}
            for name, queue in wanted.items():
                attrs = answers.get(queue.url)
                policy = attrs.get("RedrivePolicy") if attrs else None
                if not policy:
                    continue
                dlq = self._dead_letter_queue(str(policy), queue)
                if dlq is None:
                    continue
                targets[name] = dlq.url
                if dlq.url not in answers:
                    extra[dlq.url] = dlq
            answers.update(self._attributes(extra.values()))
        except (BotoCoreError, ClientError, ValueError, KeyError, TypeError) as exc:
            raise self._error(exc) from None
        stats = []
        for name, queue in wanted.items():
            attrs = answers.get(queue.url)
            if attrs is None:
                continue  # deleted since it was listed
            dead = answers.get(targets[name]) if name in targets else None
            stats.append(QueueStats(
                name=name, vhost=VHOST,
                length=int(attrs.get("ApproximateNumberOfMessages", 0)),
                unacked=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
                measures=((c.QUEUE_DELAYED, int(attrs.get("ApproximateNumberOfMessagesDelayed", 0))),
                          *(((c.QUEUE_DEAD_LETTER, int(dead.get("ApproximateNumberOfMessages", 0))),)
                            if dead is not None else ())),
            ))
        with self._lock:
            requests = self._requests
        return BrokerSnapshot(queues=stats, counters=((c.PROBE_REQUESTS, requests),))

    def _resolve(self, name: str) -> _Queue | None:
        """A queue's URL: known from listing, else one GetQueueUrl (its answer, even "missing", is kept)."""
        from botocore.exceptions import ClientError

        known = self._queues.get(name)
        if known is not None or self._predefined:
            return known
        sqs_name = entity_name(self.prefix + name)
        if sqs_name in self._missing:
            return None
        try:
            url = self._client(self._default_key).get_queue_url(QueueName=sqs_name)["QueueUrl"]
        except ClientError as exc:
            if not _not_found(exc):
                raise
            self._missing.add(sqs_name)
            return None
        queue = self._queues[name] = _Queue(str(url), self._default_key)
        return queue

    def _dead_letter_queue(self, policy: str, source: _Queue) -> _Queue | None:
        """The queue a redrive policy names (`deadLetterTargetArn` = arn:aws:sqs:region:account:name)."""
        arn = json.loads(policy).get("deadLetterTargetArn")
        if not isinstance(arn, str) or arn.count(":") < 5:
            return None
        _, _, _, region, account, name = arn.split(":", 5)
        for queue in self._queues.values():
            if queue.url.rstrip("/").endswith(f"/{account}/{name}"):
                return queue
        key = (region or source.client_key[0], source.client_key[1])
        self._credentials.setdefault(key, self._credentials[source.client_key])
        cached = self._dead_letters.get(arn)
        if cached is not None:
            return cached
        if name in self._missing:
            return None
        from botocore.exceptions import ClientError

        try:
            url = self._client(key).get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
        except ClientError as exc:
            if not _not_found(exc):
                raise
            self._missing.add(name)
            return None
        queue = self._dead_letters[arn] = _Queue(str(url), key)
        return queue

    def _attributes(self, queues: Iterable[_Queue]) -> dict[str, dict[str, str]]:
        """GetQueueAttributes of each queue, a few at a time; a queue deleted meanwhile is left out."""
        from botocore.exceptions import ClientError

        todo = list(queues)

        def one(queue: _Queue) -> tuple[str, dict[str, str] | None]:
            try:
                answer = self._client(queue.client_key).get_queue_attributes(
                    QueueUrl=queue.url, AttributeNames=list(ATTRIBUTES))
            except ClientError as exc:
                if _not_found(exc) and not queue.required:
                    return queue.url, None
                raise
            return queue.url, dict(answer.get("Attributes", {}))

        if len(todo) <= 1:
            results = [one(q) for q in todo]
        else:
            with ThreadPoolExecutor(max_workers=min(PARALLEL, len(todo))) as pool:
                results = list(pool.map(one, todo))
        return {url: attrs for url, attrs in results if attrs is not None}

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


register(ProbeKind(
    name="sqs",
    schemes=("sqs",),
    create=SQSProbe,
))
