"""The ingress's lock-free metrics expose exactly what prometheus_client's own would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from shared.metrics import LoopCounter, LoopHistogram

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1, 1, 10)
# Values on the bounds, between them and past the last one.
VALUES = st.lists(
    st.one_of(
        st.sampled_from([0.0, *BUCKETS, 11.0]),
        st.floats(min_value=0, max_value=20, allow_nan=False),
    ),
    max_size=50,
)


def _exposition(registry: CollectorRegistry) -> list[str]:
    # prometheus_client adds a `_created` timestamp to its own metrics; ours has none to give.
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


@given(VALUES)
def test_loop_histogram_matches_prometheus_histogram(values: list[float]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("latency_seconds", "How long.", buckets=BUCKETS, registry=theirs)
    histogram = LoopHistogram("latency_seconds", "How long.", BUCKETS, registry=ours)
    for value in values:
        reference.observe(value)
        histogram.observe(value)
    assert _exposition(ours) == _exposition(theirs)


@given(st.lists(st.sampled_from(["accepted", "forbidden", "invalid"]), max_size=30))
def test_loop_counter_matches_prometheus_counter(outcomes: list[str]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("requests", "Requests.", ["outcome"], registry=theirs)
    counter = LoopCounter("requests", "Requests.", "outcome", registry=ours)
    for outcome in outcomes:
        reference.labels(outcome).inc()
        counter.inc(outcome)
    assert sorted(_exposition(ours)) == sorted(_exposition(theirs))
