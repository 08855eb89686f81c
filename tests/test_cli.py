"""The `gllm` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def gllm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "gllm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_generate_json_on_the_default_model(smollm2_gguf):
    proc = gllm("generate", "--json", "--quiet", "--temperature", "0", "--max-tokens", "12", "--logprobs", "2",
                "What colour is the sky?")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "tokens", "logprobs", "usage", "timings", "finish_reason"}
    assert len(out["tokens"]) == out["usage"]["completion_tokens"] <= 12
    assert out["usage"]["prompt_tokens"] > 5 and out["text"].strip()
    assert len(out["logprobs"]) == len(out["tokens"]) and len(out["logprobs"][0]["top"]) == 2
    for lp in out["logprobs"]:   # every alternative carries its text, as the chosen token does
        assert all(isinstance(t["token"], str) for t in lp["top"])
        best = lp["top"][0]
        if best["token_id"] == lp["token_id"]:
            assert best["token"] == lp["token"]
    assert out["timings"]["ttft_ms"] > 0


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-tokens", "zero"], "--max-tokens"),
    (["--top-k", "-3"], "--top-k"),
])
def test_bad_flag_value_is_one_line_and_exit_2(flags, needle):
    proc = gllm("generate", *flags, "hello")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_structured_output_flags(llama32_dir, tmp_path):
    schema = tmp_path / "decision.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"go": {"type": "boolean"}}, "required": ["go"],
                                  "additionalProperties": False}))
    proc = gllm("generate", "--json", "--quiet", "--model", str(llama32_dir), "--json-schema", f"@{schema}",
                "--max-tokens", "40", "Go?")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["finish_reason"] == "stop" and isinstance(json.loads(out["text"])["go"], bool)
    proc = gllm("generate", "--json", "--quiet", "--model", str(llama32_dir), "--choice", "north gate",
                "--choice", "south gate", "Which gate?")
    assert proc.returncode == 0 and json.loads(proc.stdout)["text"] in ("north gate", "south gate"), proc.stderr
    proc = gllm("generate", "--quiet", "--model", str(llama32_dir), "--regex", "(", "x")
    assert proc.returncode == 2 and "regex cannot be compiled" in proc.stderr and "Traceback" not in proc.stderr
    proc = gllm("generate", "--regex", "a", "--choice", "b", "x")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    proc = gllm("generate", "--model", str(tmp_path / "nope.gguf"), "hello")
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_models_lists_the_default():
    proc = gllm("models")
    assert proc.returncode == 0 and "smollm2-135m-instruct (default)" in proc.stdout


def test_chat_ctrl_c_cancels_the_reply_not_the_program(llama32_dir):
    """Drive `gllm chat` through a pseudo-terminal: Ctrl-C mid-reply cancels it, the next line still works."""
    import pty
    import select
    import signal
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child: the real CLI on the tiny model, a reply long enough to interrupt
        os.environ["OMP_NUM_THREADS"] = "1"
        # A terminal's Ctrl-C reaches a program that did not inherit "ignore SIGINT" (a test run started in
        # the background of a non-interactive shell passes that on, and Python would then never raise it).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "gllm.cli", "chat", "--quiet", "--model", str(llama32_dir),
                                  "--max-tokens", "4000", "--temperature", "0"])
    output = b""

    def read_until(needle: bytes, start: int = 0, timeout: float = 120) -> bool:
        nonlocal output
        deadline = time.time() + timeout
        while needle not in output[start:] and time.time() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    return False
        return needle in output[start:]

    try:
        assert read_until(b"you> ")
        os.write(fd, b"Tell me a very long story\n")
        assert read_until(b"story\r\n")                # the terminal's echo of the line
        echoed = len(output)
        # The reply is streaming once its first text shows (it has ~2,000 tokens to go): only then Ctrl-C,
        # whatever the machine's speed.
        deadline = time.time() + 120
        while len(output) < echoed + 16 and time.time() < deadline:
            read_until(b"\0never", timeout=0.2)
        assert len(output) >= echoed + 16, output[-400:]
        mark = len(output)
        os.kill(pid, signal.SIGINT)
        assert read_until(b"(reply cancelled)", mark), output[-600:]
        assert read_until(b"you> ", output.index(b"(reply cancelled)"))   # back at the prompt, still running
        os.write(fd, b"/quit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_chat_save_and_load_keep_the_conversation_and_its_kv(llama32_dir, tmp_path):
    """`/save FILE` writes the messages and the KV snapshot; a new `gllm chat` process `/load`s them, restores
    the KV, and the conversation goes on; a damaged file is a message, not a crash."""
    saved = tmp_path / "npc.gllmchat"
    common = ("chat", "--quiet", "--model", str(llama32_dir), "--max-tokens", "24", "--temperature", "0",
              "--system", "You are Brann, a tired town guard. " * 3)

    def chat(lines: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run([sys.executable, "-m", "gllm.cli", *common], input=lines, capture_output=True,
                              text=True, timeout=300, env=env)

    first = chat(f"Who goes there?\n/save {saved}\n/quit\n")
    assert first.returncode == 0, first.stderr
    assert "(saved 3 messages and the KV of" in first.stderr and saved.stat().st_size > 1000
    tokens = int(first.stderr.split("and the KV of ", 1)[1].split(" tokens", 1)[0])
    assert tokens > 0
    second = chat(f"/load {saved}\nAnd the smith?\n/save {saved}\n/quit\n")
    assert second.returncode == 0, second.stderr
    assert f"(loaded 3 messages; {tokens // 16 * 16} tokens restored to the KV cache)" in second.stderr
    assert "(saved 5 messages" in second.stderr
    (tmp_path / "junk").write_bytes(b"GLLMCHAT\xff\xff\xff\xffjunk")
    third = chat(f"/load {tmp_path / 'junk'}\n/load {tmp_path / 'missing'}\n/save\n/quit\n")
    assert third.returncode == 0
    assert third.stderr.count("(cannot load:") == 2 and "(/save needs a file name)" in third.stderr
