"""`python -m gllm.bridge --model PATH --zmq tcp://127.0.0.1:5555`: run the bridge server."""

import sys

from gllm.bridge.cli import main

sys.exit(main())
