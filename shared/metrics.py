"""Prometheus metrics exported by the ingress and the workers (names are part of the dashboards)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets from 0.5 ms to 10 s: a confirmed publish sits in the low milliseconds.
_FAST_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# End-to-end buckets from 10 ms to 2 h: a voucher may wait out several retry tiers.
_FLOW_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)

INGRESS_REQUESTS = Counter(
    "bridge_ingress_requests",
    "Notifications received by the ingress, by outcome.",
    ["outcome"],
)
INGRESS_SECONDS = Histogram(
    "bridge_ingress_request_seconds",
    "Time from request to answer for notifications.",
    buckets=_FAST_BUCKETS_S,
)
PUBLISH_SECONDS = Histogram(
    "bridge_ingress_publish_seconds",
    "Time from publish to the broker's confirm.",
    buckets=_FAST_BUCKETS_S,
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
