"""Request metrics of every frontend of a cluster, summed, so that /metrics at any frontend (the port is
shared: a scrape reaches one of them at random) gives the whole cluster's view.

Each frontend publishes its request-side series (latencies, tokens, outcomes: the counters and
histograms observed as it streams) to Redis every PUBLISH_S, as Prometheus text under
`rmoe:{cluster}:metrics:{frontend}` with an expiry of EXPIRE_S (a dead frontend's series leave with
it). At scrape time `MergedRequests` adds up every live frontend's samples, series by series (counter,
histogram bucket, sum and count alike), its own taken live. Cluster-side series (worker states, loads,
faults) come from the controller's snapshot, the same at every frontend, and are not summed.

A scrape publishes this frontend's series before it reads the others', so the sums never go down
from one scrape to the next, whichever frontend answers each: every frontend's part in a scrape is at
least what any earlier scrape counted (Prometheus reads a counter that goes down as a reset, and
rate() over the reset counts the whole total again: a false spike for the alerting rules). A dead
frontend's part still leaves the sums when its key expires: that one reads as a reset.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("resilient_moe.server")

PUBLISH_S = 1.0
EXPIRE_S = 15


def metrics_key(cluster_id: str, frontend: str) -> str:
    return f"rmoe:{cluster_id}:metrics:{frontend}"


class MergedRequests:
    """A collector: this frontend's request registry, plus every other frontend's published one."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.redis = None
        self.cluster_id = ""
        self.name = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._publishing = threading.Lock()  # publishes land in the order they were rendered

    def share(self, redis_client, cluster_id: str, name: str) -> None:
        """Publish this frontend's series and add the others' from now on."""
        self.redis, self.cluster_id, self.name = redis_client, cluster_id, name
        self._thread = threading.Thread(target=self._publish, name="metrics-publish", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self.redis is not None:
            try:
                self.redis.delete(metrics_key(self.cluster_id, self.name))
            except Exception:  # noqa: BLE001 (Redis down: it expires by itself)
                pass

    def _publish(self) -> None:
        while not self._stop.wait(PUBLISH_S):
            self.publish()

    def publish(self) -> str:
        """Render this frontend's series and store them for the others; returns the text."""
        with self._publishing:
            text = generate_latest(self.registry)
            if self.redis is not None:
                try:
                    self.redis.set(metrics_key(self.cluster_id, self.name), text, ex=EXPIRE_S)
                except Exception as e:  # noqa: BLE001 (Redis down or slow: the others miss this one meanwhile)
                    log.debug("cannot publish request metrics: %s", e)
        return text.decode()

    def _others(self) -> list[str]:
        if self.redis is None:
            return []
        try:
            names = [k for k in self.redis.scan_iter(match=metrics_key(self.cluster_id, "*"), count=100)
                     if (k.decode() if isinstance(k, bytes) else k) != metrics_key(self.cluster_id, self.name)]
            texts = self.redis.mget(names) if names else []
        except Exception:  # noqa: BLE001 (Redis down: this frontend's own series only)
            return []
        return [t.decode() if isinstance(t, bytes) else t for t in texts if t]

    def collect(self) -> list[Metric]:
        families: dict[str, Metric] = {}
        totals: dict[str, dict[tuple, float]] = {}
        texts = [self.publish(), *self._others()]  # ours first: see the module docstring
        for text in texts:
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError:
                continue  # a frontend of another version: left out
            for family in parsed:
                if family.name.endswith("_created"):
                    continue  # creation times do not add up
                families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                sums = totals.setdefault(family.name, {})
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    sums[key] = sums.get(key, 0.0) + sample.value
        out = []
        for name, family in families.items():
            for (sample, labels), value in totals[name].items():
                family.add_sample(sample, dict(labels), value)
            out.append(family)
        return out
