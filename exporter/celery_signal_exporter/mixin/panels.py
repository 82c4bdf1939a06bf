"""Stable panel ids, by dashboard and title, and the links alerts carry to them.

An alert's `dashboard_url` opens one panel (`viewPanel=<id>`), and people
bookmark those links, so an id never changes and is never reused: a new panel
takes the next free number, a removed one leaves a gap. Kept apart from
dashboards.py so that the rules need no Grafana SDK.
"""

from __future__ import annotations

from celery_signal_exporter.mixin.config import Config

OVERVIEW = "overview"
TASKS = "tasks"
QUEUES = "queues"
PERIODIC = "periodic"
WORKERS = "workers"
OBJECTIVES = "objectives"

IDS: dict[str, dict[str, int]] = {
    OVERVIEW: {
        "Throughput": 1,
        "Published vs completed": 2,
        "Failure ratio": 3,
        "Queues": 4,
        "Queue length": 5,
        "Backlog growth": 6,
        "Estimated time to drain": 7,
        "Latency": 8,
        "Runtime quantiles": 9,
        "Queue wait quantiles": 10,
        "Workers and broker": 11,
        "Workers up": 12,
        "Pool utilisation": 13,
        "Broker memory": 14,
    },
    TASKS: {
        "Outcomes": 1,
        "Runs by outcome": 2,
        "Failures by exception": 3,
        "Retries, revokes and expirations": 4,
        "In progress": 5,
        "Latency": 6,
        "Runtime quantiles": 7,
        "Queue wait quantiles": 8,
        "Runtime heatmap": 9,
        "Queue wait heatmap": 10,
        "Freshness": 11,
        "Time since last success": 12,
        "Resources": 13,
        "CPU per runtime second": 14,
        "Memory growth p95": 15,
        "Oldest run vs time limit": 16,
        "Publishing": 17,
        "Publish rate by instance": 18,
        "Publish latency p95 by instance": 19,
        "Waiting to start": 20,
    },
    QUEUES: {
        "Queues": 1,
        "Length": 2,
        "Unacked": 3,
        "Consumers": 4,
        "Oldest message age": 5,
        "Queue wait p95": 6,
        "Broker": 7,
        "Broker up": 8,
        "Memory": 9,
        "Alarms": 10,
        "Probe health": 11,
        "Probe duration": 12,
        "Probe errors": 13,
        "Since last successful probe": 14,
        "Exporter health": 15,
        "Instrumentation errors": 16,
        "Metrics files and cardinality": 17,
        "Scrape duration": 18,
        "Writes lost": 19,
    },
    PERIODIC: {
        "Beat": 1,
        "Beat up": 2,
        "Alerts": 3,
        "Entries": 4,
        "Runs": 5,
        "Overlaps": 6,
        "Expired and unstarted runs": 7,
        "Dispatch failures": 8,
    },
    OBJECTIVES: {
        "Objectives": 1,
        "Queues against their objectives": 2,
        "Expected wait vs objective": 3,
        "Share started within objective": 4,
        "Burn rate": 5,
        "Error budget left": 6,
        "Arrivals per start": 7,
        "Oldest message vs objective": 8,
        "Runtime objectives": 9,
    },
    WORKERS: {
        "Memory": 1,
        "Resident memory": 2,
        "Largest pool process": 3,
        "Held tasks": 4,
        "Reserved by queue": 5,
        "Scheduled by queue": 6,
        "Slots": 7,
        "Slots per queue": 8,
        "Tasks active": 9,
        "Consuming queues": 10,
    },
}


def uid(c: Config, dashboard: str) -> str:
    """A dashboard's uid: the prefix lets two installs of the mixin share one Grafana."""
    return f"{c.uid_prefix}-{dashboard}"


def url(c: Config, dashboard: str, title: str) -> str:
    """The Grafana link that opens one panel on its own."""
    return f"{c.grafana_url.rstrip('/')}/d/{uid(c, dashboard)}?viewPanel={IDS[dashboard][title]}"
