"""Metrics: continual-learning summaries (and, later, the service's Prometheus metrics)."""
