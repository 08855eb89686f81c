"""OpenAI-compatible HTTP front end, serving Prometheus metrics and the live dashboard (``pip install gllm[http]``).

    from gllm.http import HttpFrontEnd, Metrics
    front = HttpFrontEnd(engine, "127.0.0.1", 8080, metrics=Metrics(engine))
    front.start(); ...; front.stop()

`Metrics` lives in `gllm.frontend.metrics` (every front end feeds it); it is re-exported here.
"""

from gllm.frontend.metrics import Metrics
from gllm.http.server import HttpFrontEnd

__all__ = ["HttpFrontEnd", "Metrics"]
