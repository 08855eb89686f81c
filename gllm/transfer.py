"""`to_device`: small host-side lists onto the GPU without stalling the host.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronises the stream:
the host waits for every kernel queued before it (a whole model step). Staging through pinned
memory and copying without blocking keeps the copy in stream order and the host free; PyTorch's
pinned-memory cache does not reuse the staging buffer until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        host = torch.tensor(values, dtype=dtype)
        return host if device.type == "cpu" else host.to(device)
    # Made in pinned memory, not pinned after: `Tensor.pin_memory` first asks the driver whether the tensor is
    # pinned already, ~50 us of host time a call on an H200 host (docs/benchmarks.md, issue 21).
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
