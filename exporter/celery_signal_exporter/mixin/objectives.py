"""Rules from each queue's objective: indicators, the predicted breach and burn-rate pages.

A queue's objective says how long its tasks may wait: `target` (99 %) of them start within `wait`
of their publish. Each queue takes the first objective whose regex matches it, else the default, so
every rule below is written once per objective with that objective's queue matchers and constants.
Two kinds of page answer "will tasks on this queue wait longer than it allows?":

- CeleryQueueWaitWillBreach looks ahead. The expected wait of a task published now is the true
  backlog over the start rate (Little's law: `queue:celery_queue_drain_seconds:estimate`). While
  arrivals outrun starts by a ratio r, that wait grows by (r - 1) seconds a second, so in
  `breach_horizon` it reaches wait + horizon x (r - 1). r is read as 1 + backlog growth / starts over
  a long window (30 m sees arrivals 5 % over starts through Poisson noise) and a short one (5 m, for
  fast overloads), whichever is larger. It pages while the backlog still grows (a burst stops growing
  at once and never holds for `breach_for`) and the queue is not near-empty.
- CeleryQueueWaitBudgetBurn looks back: the share of starts later than the objective, read from the
  histogram bucket at the objective, burning the error budget at the SRE workbook's rates
  (1 h with 5 m at 14.4 x, 6 h with 30 m at 6 x: page; 1 d with 2 h at 3 x, 3 d with 6 h at 1 x: ticket).
"""

from __future__ import annotations

import re
from typing import Any

from celery_signal_exporter.mixin.alert import Alert, num
from celery_signal_exporter.mixin.config import BurnWindows, Config, QueueObjective, matcher, seconds
from celery_signal_exporter.mixin.panels import OBJECTIVES

EXPECTED_WAIT = "queue:celery_queue_drain_seconds:estimate"
BACKLOG = "queue:celery_queue_backlog:sum"
PREDICTED = "queue:celery_queue_wait_seconds:predicted"
HEAD_AGE = "queue:celery_queue_oldest_message_age_seconds:max"
OBJECTIVE_SECONDS = "queue:celery_task_queue_wait:objective_seconds"
OBJECTIVE_RATIO = "queue:celery_task_queue_wait:objective_ratio"


def le(bound: float) -> str:
    """A regex for a bucket's `le` label: client libraries write 300 as "300" or "300.0"."""
    text = f"{bound:g}"
    return re.escape(text) + (r"(\.0)?" if "." not in text and "e" not in text else "")


# Recorded once per window, told apart by a `window` label (a name holding the window would differ
# between the production rules and a scaled profile's).
ERROR_RATIO = "queue:celery_task_queue_wait:error_ratio"  # share of starts later than the objective
ARRIVALS_RATIO = "queue:celery_queue_arrivals_per_start:ratio"  # 1 = arrivals balance starts
RUNTIME_ERROR_RATIO = "task:celery_task_runtime:error_ratio"  # share of runs longer than the objective


def window(w: str) -> str:
    return f'window="{w}"'


def windows(c: Config) -> list[str]:
    """Every window a burn condition reads, shortest first, each once."""
    found = {w for b in (*c.burn_page, *c.burn_ticket) for w in (b.long, b.short)}
    return sorted(found, key=seconds)


def _queues_of(c: Config, index: int) -> str:
    """One series per queue that takes objective `index`: every queue with a backlog or starts."""
    sel = ", ".join(c.objective_matchers(index))
    return f"group by ({c.by}queue_name) ({BACKLOG}{{{sel}}} or queue:celery_task_started:rate{{{sel}}})"


def recording_rules(c: Config) -> list[dict[str, Any]]:
    """Indicators per (group labels, queue), and per task for runtime objectives."""
    g = c.by
    rules: list[dict[str, Any]] = [
        {
            # The head message's age where the broker reports it (Redis; RabbitMQ classic queues).
            "record": HEAD_AGE,
            "expr": f"max by ({g}queue_name) (celery_queue_oldest_message_age_seconds{{{c.sel()}}})",
        },
    ]

    def started(w: str) -> str:
        return f"sum by ({g}queue_name) (increase(celery_task_started_total{{{c.sel()}}}[{w}]))"

    for w in (c.breach_short_window, c.breach_long_window):
        rules.append({
            # Arrivals per start: 1 + the backlog's growth per task started over the window. Needs no
            # instrumented producer; prefetch and ETAs cannot hide growth (the true backlog holds them).
            "record": ARRIVALS_RATIO,
            "expr": f"1 + delta({BACKLOG}[{w}])\n/\n{started(w)}",
            "labels": {"window": w},
        })
    rules.append({
        # The expected wait of a task published `breach_horizon` from now if arrivals keep their ratio
        # (the larger of the two windows'); a draining queue's is its expected wait now.
        "record": PREDICTED,
        "expr": f"{EXPECTED_WAIT}\n+ {num(seconds(c.breach_horizon))} * clamp_min(\n"
        f"  max by ({g}queue_name) ({ARRIVALS_RATIO}) - 1,\n  0\n)",
    })
    for i, o in enumerate(c.queue_objectives):
        mine = c.objective_matchers(i)
        rules.append({"record": OBJECTIVE_SECONDS, "expr": f"{num(seconds(o.wait))} * {_queues_of(c, i)}"})
        rules.append({"record": OBJECTIVE_RATIO, "expr": f"{num(o.target)} * {_queues_of(c, i)}"})
        for w in windows(c):
            rules.append({"record": ERROR_RATIO, "labels": {"window": w},
                          "expr": _late(c, "celery_task_queue_wait_seconds", "queue_name", mine, o.wait, w)})
        rules += _runtime_rules(c, o, mine)
    return rules


def _runtime_matchers(o: QueueObjective, mine: tuple[str, ...], j: int) -> tuple[str, ...]:
    earlier = (matcher("name", r.task, "!~") for r in o.runtime[:j])
    return (*mine, matcher("name", o.runtime[j].task), *earlier)


def _late(c: Config, histogram: str, by: str, matchers: tuple[str, ...], objective: str, w: str) -> str:
    """The share of a histogram's observations over `objective` within `w`: 1 - its bucket / its count."""
    within = c.sel(*matchers, matcher("le", le(seconds(objective))))
    per = f"sum by ({c.by}{by})"
    return (f"1 - (\n  {per} (rate({histogram}_bucket{{{within}}}[{w}]))\n"
            f"  /\n  {per} (rate({histogram}_count{{{c.sel(*matchers)}}}[{w}]))\n)")


def _runtime_rules(c: Config, o: QueueObjective, mine: tuple[str, ...]) -> list[dict[str, Any]]:
    per = "name, queue_name"
    return [
        {"record": RUNTIME_ERROR_RATIO, "labels": {"window": w},
         "expr": _late(c, "celery_task_runtime_seconds", per, _runtime_matchers(o, mine, j), r.within, w)}
        for j, r in enumerate(o.runtime)
        for w in windows(c)
    ]


def _burning(series: str, pairs: tuple[BurnWindows, ...], budget: float, matchers: tuple[str, ...]) -> str:
    """Either pair burns: both its windows' error ratios over factor x budget. `ignoring (window)`
    lets the long window's series meet the short one's; one alert per queue, valued at the larger long
    window's share."""
    sel = ", ".join(matchers)
    either = "\nor\n".join(
        f"(\n  {series}{{{window(p.long)}, {sel}}} > {num(p.factor * budget)}\n"
        f"  and ignoring (window)\n  {series}{{{window(p.short)}, {sel}}} > {num(p.factor * budget)}\n)"
        for p in pairs
    )
    return f"max without (window) (\n{either}\n)"


def _pairs(pairs: tuple[BurnWindows, ...]) -> str:
    return " or ".join(f"{p.long} and {p.short} at {num(p.factor)}x" for p in pairs)


def _expected_wait_now(c: Config) -> str:
    """An annotation sentence quoting the queue's expected wait now, read at notification time with
    the template's `query` (nothing where the queue has no backlog series)."""
    labels = (*c.group_labels, "queue_name")
    selector = ", ".join(f"{label}=%q" for label in labels)
    args = " ".join(f"$labels.{label}" for label in labels)
    return (f'{{{{ with printf "{EXPECTED_WAIT}{{{selector}}}" {args} | query }}}} A task published now waits '
            "about {{ . | first | value | humanizeDuration }}.{{ end }}")


def alerts(c: Config) -> list[Alert]:
    """The objective pages and tickets, one rule per objective and alert."""
    where = "".join(f"{{{{ $labels.{label} }}}}/" for label in c.group_labels)
    queue = f"{where}{{{{ $labels.queue_name }}}}"
    found: list[Alert] = []
    for i, o in enumerate(c.queue_objectives):
        mine = c.objective_matchers(i)
        sel = ", ".join(mine)
        t = seconds(o.wait)
        budget = 1 - o.target
        percent = f"{num(round(o.target * 100, 4))}%"
        objective = f"{percent} of tasks start within {o.wait}"
        labels = {"objective": o.wait, "objective_target": num(o.target)}
        found.append(Alert(
            "CeleryQueueWaitWillBreach",
            f"{EXPECTED_WAIT}{{{sel}}} >= {num(c.breach_floor_ratio * t)}\n"
            f"and\n{PREDICTED}{{{sel}}} > {num(t)}\n"
            f"and\n{BACKLOG}{{{sel}}} >= {num(c.backlog_floor)}\n"
            f"and\n{BACKLOG}{{{sel}}} > {BACKLOG}{{{sel}}} offset {c.breach_guard_window}",
            c.breach_for,
            "critical",
            "Tasks on a Celery queue will soon wait longer than its objective.",
            f"A task published now on queue {queue} waits about {{{{ $value | humanizeDuration }}}} (backlog / "
            f"start rate), and tasks arrive faster than workers start them: at this pace the wait passes the "
            f"objective ({objective}) within {c.breach_horizon}.",
            (OBJECTIVES, "Expected wait vs objective"),
            labels,
        ))
        found.append(Alert(
            "CeleryQueueWaitBudgetBurn",
            _burning(ERROR_RATIO, c.burn_page, budget, mine),
            c.burn_for,
            "critical",
            "Tasks on a Celery queue wait longer than its objective allows.",
            f"{{{{ $value | humanizePercentage }}}} of tasks from queue {queue} started later than {o.wait} "
            f"(objective: {objective}; burn over {_pairs(c.burn_page)} the budget): the {c.budget_period} "
            f"error budget is going fast.{_expected_wait_now(c)}",
            (OBJECTIVES, "Share started within objective"),
            labels,
        ))
        found.append(Alert(
            "CeleryQueueWaitBudgetBurnSlow",
            _burning(ERROR_RATIO, c.burn_ticket, budget, mine),
            "0s",
            "warning",
            "Tasks on a Celery queue wait longer than its objective, slowly using up its budget.",
            f"{{{{ $value | humanizePercentage }}}} of tasks from queue {queue} started later than {o.wait} "
            f"(objective: {objective}; burn over {_pairs(c.burn_ticket)} the budget).{_expected_wait_now(c)}",
            (OBJECTIVES, "Share started within objective"),
            labels,
        ))
        found.append(Alert(
            "CeleryOldestMessageTooOld",
            f"{HEAD_AGE}{{{sel}}} > {num(t)}",
            c.oldest_message_for,
            "warning",
            "The next message in a Celery queue has waited longer than its objective.",
            f"The message at the head of queue {queue} has been due for {{{{ $value | humanizeDuration }}}}; "
            f"the objective is {objective}.",
            (OBJECTIVES, "Oldest message vs objective"),
            labels,
        ))
        for j, r in enumerate(o.runtime):
            rsel = _runtime_matchers(o, mine, j)
            found.append(Alert(
                "CeleryTaskRuntimeBudgetBurn",
                _burning(RUNTIME_ERROR_RATIO, (*c.burn_page, *c.burn_ticket), 1 - r.target, rsel),
                c.burn_for,
                "warning",
                "A Celery task runs longer than its objective too often.",
                f"{{{{ $value | humanizePercentage }}}} of runs of task {where}{{{{ $labels.name }}}} on queue "
                f"{{{{ $labels.queue_name }}}} took longer than {r.within} (objective: "
                f"{num(round(r.target * 100, 4))}% within {r.within}).",
                (OBJECTIVES, "Runtime objectives"),
                {"objective": r.within, "objective_target": num(r.target)},
            ))
    return found
