"""Which queue a message went to (producer) or came from (worker).

Celery's request keeps only the exchange and routing key, and the two only
name the queue by convention. The worker knows better: on AMQP the message's
consumer tag names the consumer and so the queue; on every transport the
queues the worker consumes from declare their bindings. Answers are cached,
so a lookup on the hot path is one dict access.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

from celery_signal_exporter.labels import OVERFLOW

#: Entries any per-task lookup cache keeps; past it (routing keys made up per call, say)
#: answers are worked out each time instead, so memory stays bounded.
CACHE_LIMIT = 4096


class QueueResolver:
    """Queue label values: `label` turns a queue's real name into its label value (capped, cut),
    once per name, since every answer it gives is cached."""

    def __init__(self, app: Celery, label: Callable[[str], str] = str) -> None:
        self.app = app
        self.label = label
        self._publish: dict[tuple[Any, Any], str] = {}
        self._tags: dict[str, str] = {}
        self._bindings: dict[tuple[str, str], str] = {}
        self._bindings_of: int = 0

    def for_publish(self, exchange: Any, routing_key: Any) -> str:
        """The queue a published message is meant for, from the app's queue config."""
        key = (exchange, routing_key)
        queue = self._publish.get(key)
        if queue is None:
            queue = self.label(self._from_config(exchange, routing_key))
            # A folded queue is not remembered, so each of its messages is counted as a fold.
            if queue != OVERFLOW and len(self._publish) < CACHE_LIMIT:
                self._publish[key] = queue
        return queue

    def _from_config(self, exchange: Any, routing_key: Any) -> str:
        exchange = exchange.name if hasattr(exchange, "name") else (exchange or "")
        routing_key = routing_key or ""
        if not exchange and routing_key:
            return str(routing_key)  # the default exchange routes by queue name
        try:
            for queue in self.app.amqp.queues.values():
                if queue.routing_key == routing_key and queue.exchange is not None \
                        and queue.exchange.name == exchange:
                    return str(queue.name)
        except Exception:  # noqa: BLE001 - config we cannot read; fall back
            pass
        return str(routing_key or exchange or "unknown")

    def for_message(self, consumer: Any, message: Any) -> str:
        """The label of the queue a worker really consumed `message` from.

        Called once per (task, delivery) by the worker main process, which caches the answer.
        """
        info = getattr(message, "delivery_info", None) or {}
        task_consumer = getattr(consumer, "task_consumer", None)
        tag = info.get("consumer_tag")
        if tag is not None and task_consumer is not None:
            queue = self._tags.get(tag)
            if queue is None:
                # kombu keeps queue name -> consumer tag for the queues it consumes.
                active = getattr(task_consumer, "_active_tags", {}) or {}
                self._tags = {str(t): str(q) for q, t in active.items()}
                queue = self._tags.get(str(tag))
            if queue is not None:
                return self.label(queue)
        exchange, routing_key = info.get("exchange") or "", info.get("routing_key") or ""
        if task_consumer is not None:
            queues = getattr(task_consumer, "queues", None) or []
            if len(queues) != self._bindings_of:
                self._bindings = {
                    (q.exchange.name if q.exchange is not None else "", q.routing_key or ""): q.name
                    for q in queues
                }
                self._bindings_of = len(queues)
            queue = self._bindings.get((exchange, routing_key))
            if queue is not None:
                return self.label(str(queue))
        return self.for_publish(exchange, routing_key)
