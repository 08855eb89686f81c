"""OpenAI-compatible HTTP front end, Prometheus metrics and the live dashboard (``pip install gllm[http]``).

    from gllm.http import HttpFrontEnd, Metrics
    front = HttpFrontEnd(engine, "127.0.0.1", 8080, metrics=Metrics(engine))
    front.start(); ...; front.stop()
"""

from gllm.http.metrics import Metrics
from gllm.http.server import HttpFrontEnd

__all__ = ["HttpFrontEnd", "Metrics"]
