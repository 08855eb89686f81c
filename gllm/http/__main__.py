"""`python -m gllm.http --model PATH --http 127.0.0.1:8080`: run the OpenAI-compatible server."""

import sys

from gllm.serve import main_http

sys.exit(main_http())
