"""The ZeroMQ + msgpack bridge: how game engines (Unity, Godot, Unreal) reach the engine.

- `gllm.bridge.protocol`: message schemas, validation, canonical encoding (the spec is bindings/PROTOCOL.md)
- `gllm.bridge.server`: `BridgeServer`, one engine behind a ROUTER socket (`gllm serve`)
- `gllm.bridge.client`: `BridgeClient` (non-blocking `poll(max_ms)` for game loops), `AsyncBridgeClient`
- `gllm.bridge.zmtp`: a minimal pure-Python ZMTP 3.1 DEALER, the reference for hand-written clients

Importing this package does not import torch; only the server needs the engine.
"""
