"""Metrics: continual-learning summaries (:mod:`.continual`) and the service's Prometheus
metrics (:mod:`.prometheus`, served with the health probes by :mod:`.server`).

Nothing is re-exported here on purpose: ``streamcl simulate`` imports ``.continual`` and should
not pay for (or require) ``prometheus_client``; import ``streamcl.metrics.prometheus`` directly.
"""
