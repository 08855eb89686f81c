"""What the front ends (`gllm.bridge`, `gllm.http`, `gllm serve`) share.

- `gllm.frontend.engine_flags`: the engine's command-line flags, declared once, and `GeneratorParams` from them
- `gllm.frontend.helpers`: the model name clients see, loopback checks, flag and config number checks
- `gllm.frontend.metrics`: `Metrics`, the Prometheus registry every front end feeds (needs ``gllm[http]``)
- `gllm.frontend.live`: `LiveView`, what the dashboard shows (requests in flight, throughput, steps)

Importing this package imports nothing else; each module imports only what it needs.
"""
