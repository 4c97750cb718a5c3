"""streamcl: an event-sourced streaming online continual learner.

Data flows one way: message -> batch -> trainer -> strategy -> snapshot/registry -> metrics.
This package's learning core (``streamcl.trainer``, ``streamcl.strategies``, ``streamcl.drift``)
knows nothing of Kafka; the streaming service drives it one micro-batch at a time.
"""

__version__ = "0.1.0"

# The strategy that is best across the benchmark suite's streams (bench/suite.py,
# docs/benchmarks.md): what `streamcl run`, `demo` and `simulate` train with by default.
DEFAULT_STRATEGY = "il2m-der"
