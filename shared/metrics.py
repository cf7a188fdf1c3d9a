"""Prometheus metrics exported by the ingress and the workers (names are part of the dashboards)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import INF, floatToGoString

# How prometheus_client spells a bucket bound ("1.0", "+Inf"); the library leaves it untyped.
_bound_label: Callable[[float], str] = floatToGoString

# Latency buckets from 0.5 ms to 10 s: a confirmed publish sits in the low milliseconds.
_FAST_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# End-to-end buckets from 10 ms to 2 h: a voucher may wait out several retry tiers.
_FLOW_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)


class LoopCounter(Collector):
    """A counter by one label, updated from one event-loop thread only: plain ints, no lock.

    prometheus_client's metrics take a lock on every update; on the ingress's hot path its
    counter and two histograms cost about 3 us per notification, these about 0.6 us. The
    exposition is still prometheus_client's (the scrape runs on the same loop).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._values: dict[str, int] = {}
        if registry is not None:
            registry.register(self)

    def inc(self, label_value: str) -> None:
        self._values[label_value] = self._values.get(label_value, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        for label_value, count in sorted(self._values.items()):
            family.add_metric([label_value], count)
        yield family


class LoopHistogram(Collector):
    """A histogram updated from one event-loop thread only (see LoopCounter)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in sorted(buckets))
        # One slot per bound, and a last one for values above every bound (+Inf only).
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, value: float) -> None:
        # A value equal to a bound belongs to that bucket (le = "less than or equal").
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[Metric]:
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*self._bounds, INF), self._counts, strict=True):
            cumulative += count
            buckets.append((_bound_label(bound), cumulative))
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], buckets, sum_value=self._sum)
        yield family


INGRESS_REQUESTS = LoopCounter(
    "bridge_ingress_requests", "Notifications received by the ingress, by outcome.", "outcome"
)
DOSHII_WEBHOOKS = LoopCounter(
    "bridge_doshii_webhooks",
    "Doshii webhooks received by the ingress, by outcome (accepted, spooled, ignored, ...).",
    "outcome",
)
INGRESS_SECONDS = LoopHistogram(
    "bridge_ingress_request_seconds",
    "Time from request to answer for notifications.",
    _FAST_BUCKETS_S,
)
PUBLISH_SECONDS = LoopHistogram(
    "bridge_ingress_publish_seconds", "Time from publish to the broker's confirm.", _FAST_BUCKETS_S
)
SPOOL_DEPTH = Gauge(
    "bridge_spool_depth", "Notifications in the ingress spool, not yet in the broker."
)
SPOOL_OLDEST_AGE = Gauge(
    "bridge_spool_oldest_age_seconds", "Age of the oldest notification in the ingress spool."
)

STAGE_MESSAGES = Counter(
    "bridge_stage_messages",
    "Messages handled by a worker stage, by outcome (done, rejected, retried, dead).",
    ["stage", "outcome"],
)
STAGE_SECONDS = Histogram(
    "bridge_stage_seconds",
    "Time a worker stage spent on one message.",
    ["stage"],
    buckets=_FAST_BUCKETS_S,
)
NOTIFICATION_TO_DOSHII_SECONDS = Histogram(
    "bridge_notification_to_doshii_seconds",
    "Time from the ingress receiving a notification to Doshii accepting its update.",
    buckets=_FLOW_BUCKETS_S,
)
OLDEST_MESSAGE_AGE = Gauge(
    "bridge_stage_oldest_message_age_seconds",
    "Age (since the ingress received it) of the last message a stage started on.",
    ["stage"],
)


# The ledger and its sweeper.
LEDGER_WRITES = Counter(
    "bridge_ledger_writes_total", "Batches of journey steps written to PostgreSQL", ["result"]
)
LEDGER_STEPS = Counter("bridge_ledger_steps_total", "Journey steps written (copies included)")
LEDGER_WRITE_SECONDS = Histogram(
    "bridge_ledger_write_seconds",
    "Time to write one batch of steps, retries while PostgreSQL is away included",
    buckets=_FLOW_BUCKETS_S,
)
VOUCHERS_BY_STATE = Gauge("bridge_vouchers", "Vouchers in the ledger by state", ["state"])
STUCK_VOUCHERS = Gauge(
    "bridge_vouchers_stuck",
    "Vouchers that need an operator, or have not moved for BRIDGE_SWEEP_READY_AFTER_S",
)
OLDEST_UNFINISHED_AGE = Gauge(
    "bridge_voucher_oldest_unfinished_age_seconds",
    "Age of the oldest voucher that is not activated, cancelled, rejected or expired",
)
SWEEP_OUTCOMES = Counter(
    "bridge_sweep_outcomes_total", "What the sweeper found and did, by outcome", ["outcome"]
)
