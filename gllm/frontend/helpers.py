"""Small helpers every front end uses: the model name clients see, loopback checks, number checks.

No torch, no ZeroMQ, no HTTP framework here: command-line parsing and config validation use these before
anything is loaded.
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gllm.request_fields import FieldError, RequestField


# ----------------------------------------------------------------------------------------- names and text
def short_model_name(name: Any) -> str:
    """What clients see as the model: a known name or HF id as given; a local path by its last part only."""
    text = str(name)
    try:
        path = Path(text).expanduser()
        if path.exists():
            return path.resolve().name or text
    except OSError:
        pass
    return text


def preview(text: str, limit: int = 200) -> str:
    """A request's prompt in one short line, for the dashboard."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------- loopback
def is_loopback_host(host: str, *, localhost_subdomains: bool = False) -> bool:
    """True when only this machine can reach ``host``: ``localhost`` or a loopback IP address (IPv6 with or
    without brackets). With ``localhost_subdomains``, ``*.localhost`` too (RFC 6761: always loopback; for
    names a browser sends, as in a Host header). '', '0.0.0.0', '*' and other names are not provably loopback."""
    name = host.strip("[]").lower()
    if name == "localhost" or (localhost_subdomains and name.endswith(".localhost")):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_local_address(address: str) -> bool:
    """True for ZeroMQ endpoints only this machine can reach: loopback TCP, ipc://, inproc://."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    if ";" in rest:                       # tcp://source;dest: judge the address bound, the part after ';'
        rest = rest.split(";", 1)[1]
    host = urlsplit("//" + rest).hostname
    if host is None:
        return False
    return host == "lo" or is_loopback_host(host)   # 'lo': ZeroMQ binds an interface by its name


# ----------------------------------------------------------------------------------------- numbers
def _parse_number(text: str, kind: type, flag: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} must be {kind.__name__}, got {text!r}") from None


def positive(kind: type, flag: str) -> Callable[[str], Any]:
    """An argparse ``type``: a number of ``kind`` (int or float) that must be > 0."""
    def parse(text: str):
        value = _parse_number(text, kind, flag)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be > 0, got {text}")
        return value
    return parse


def field_flag(f: RequestField) -> Callable[[str], Any]:
    """An argparse ``type`` for one field of the request field table: its kind and its bounds."""
    flag = "--" + f.wire_name.replace("_", "-")

    def parse(text: str):
        value = _parse_number(text, float if f.kind == "float" else int, flag)
        try:
            return f.check(value, flag)
        except FieldError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def require_positive_int(name: str, value: Any) -> None:
    """For config objects: ValueError unless ``value`` is an int >= 1."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def require_positive(name: str, value: Any) -> None:
    """For config objects: ValueError unless ``value`` is a number > 0."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
