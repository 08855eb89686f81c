"""`python -m gllm.bridge --model PATH --zmq tcp://127.0.0.1:5555`: run the bridge server."""

import sys

from gllm.serve import main_bridge

sys.exit(main_bridge())
