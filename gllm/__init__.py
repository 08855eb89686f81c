"""gllm: a local LLM inference runtime that games embed."""

import os

# Before torch loads OpenMP: idle worker threads must sleep, not spin, or they steal the
# game's cores (and on two shared cores can slow inference many times over).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
