"""The request path's lock-free families expose exactly what prometheus_client's own would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from llamad.metrics import LATENCY_BUCKETS, RequestCounter, RequestHistogram

OBSERVATIONS = [0.0, 0.001, 0.0031, 0.5, 1, 2.5, 599.9, 700]  # on a bound, between, past the last


@pytest.mark.parametrize("labelnames", [(), ("route",)])
def test_a_request_histogram_is_exposed_as_prometheus_clients(labelnames):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = RequestHistogram("x_seconds", "Help.", labelnames, buckets=LATENCY_BUCKETS, registry=ours)
    reference = Histogram("x_seconds", "Help.", labelnames, buckets=LATENCY_BUCKETS, registry=theirs)
    assert generate_latest(ours) == generate_latest(theirs)  # no series yet: HELP and TYPE only
    for amount in OBSERVATIONS:
        if labelnames:
            fast.labels("/a").observe(amount)
            reference.labels("/a").observe(amount)
            fast.labels("/b").observe(amount / 2)
            reference.labels("/b").observe(amount / 2)
        else:
            fast.observe(amount)
            reference.observe(amount)
    assert generate_latest(ours) == generate_latest(theirs)


def test_a_request_counter_is_exposed_as_prometheus_clients():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = RequestCounter("x", "Help.", ["route", "code"], registry=ours)
    reference = Counter("x", "Help.", ["route", "code"], registry=theirs)
    for labels, amount in ((("/a", 200), 1), (("/a", 200), 2.5), (("/b", 404), 1)):
        fast.labels(*labels).inc(amount)
        reference.labels(*labels).inc(amount)
    assert generate_latest(ours) == generate_latest(theirs)


def test_labels_must_match_the_family():
    family = RequestCounter("x", "Help.", ["route"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="expected labels"):
        family.labels("/a", "extra")
