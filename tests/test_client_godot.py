"""The Godot 4 addon (bindings/godot/addons/gllm), pure GDScript, run by a real headless Godot 4 (Debian sid's
`godot` 4.6.x from a private root built by tools/setup_godot.sh) against a real `gllm serve` on the tiny model,
through the cross-client conformance harness (tests/clients):

- every scenario of tests/clients/scenarios.json passes (one test each) with bindings/godot/tests/run_tests.gd,
  which prints `N passed, N failed` and exits 1 on a failure; the runner does fail when a test vector is wrong;
- the GDScript compiles with no script error (a compile error in any addon file fails the runner's project);
- the example project (examples/godot) opens and runs headless against a real server: its three NPCs each
  complete a streamed reply, with no script error in its output;
- every .gd file passes gdtoolkit's `gdlint` and `gdformat --check`.

Godot comes from `make client-deps` (tools/setup_godot.sh; GODOT_BIN overrides it). Where it cannot be installed
(not root, no apt) these tests skip and say why; on a machine that can install it, the setup script fails loudly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clients.harness import (
    SCENARIO_NAMES,
    ConformanceRun,
    check_complete_run,
    check_wrong_vector_failed,
    load_scenarios,
    load_vectors,
    wrong_vector_spec,
)

ROOT = Path(__file__).resolve().parent.parent
GODOT_DIR = ROOT / "bindings" / "godot"
ADDON = GODOT_DIR / "addons" / "gllm"
RUNNER = GODOT_DIR / "tests" / "run_tests.gd"
EXAMPLE = ROOT / "examples" / "godot"
CACHE = Path(os.environ.get("GLLM_CACHE", Path.home() / ".cache" / "gllm"))
SCRIPT_ERROR = re.compile(r"SCRIPT ERROR|Parse Error|Compile Error|Failed to load script|Invalid call|"
                          r"Invalid access|Invalid get|Invalid set|Invalid assignment|Nonexistent function")
PROJECT = """config_version=5

[application]
config/name="{name}"
"""


def godot_binary() -> str | None:
    explicit = os.environ.get("GODOT_BIN")
    if explicit:
        return explicit
    wrapper = CACHE / "godot"
    if wrapper.is_file() and os.access(wrapper, os.X_OK):
        return str(wrapper)
    return shutil.which("godot4") or shutil.which("godot")


@pytest.fixture(scope="module")
def godot() -> str:
    path = godot_binary()
    if path is None:
        pytest.skip("Godot 4 is not installed: run `make client-deps` (tools/setup_godot.sh builds a Debian sid "
                    "root with Godot 4 as root) or set GODOT_BIN")
    proc = subprocess.run([path, "--headless", "--version"], capture_output=True, text=True, timeout=60)
    version = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    # Found but broken (sid's package changed, a library went missing): fail, never skip.
    assert proc.returncode == 0 and version.startswith("4."), \
        f"{path} is not a working Godot 4: {proc.stdout}{proc.stderr}"
    return path


def make_project(dest: Path, name: str, with_tests: bool = True) -> Path:
    """A throwaway Godot project holding the addon (and the runner): Godot writes its .godot cache there."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "project.godot").write_text(PROJECT.format(name=name))
    shutil.copytree(ADDON, dest / "addons" / "gllm")
    if with_tests:
        shutil.copytree(RUNNER.parent, dest / "tests")
    return dest


@pytest.fixture(scope="module")
def project(godot, tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("godot-project"), "gllm-conformance")


def runner_command(godot: str, project: Path) -> list[str]:
    return [godot, "--headless", "--path", str(project), "--script", "res://tests/run_tests.gd", "--"]


# ------------------------------------------------------------------------------------------ conformance
@pytest.fixture(scope="module")
def conformance(godot, project, llama32_dir, tmp_path_factory):
    run = ConformanceRun(llama32_dir, tmp_path_factory.mktemp("godot-conformance"))
    result = run.run(runner_command(godot, project), timeout_s=540)
    print(result.output)
    return result


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_scenario(conformance, name):
    assert conformance.passed(name), conformance.detail(name)


def test_every_scenario_reported_once_and_the_summary_line(conformance):
    cost = check_complete_run(conformance)
    assert not SCRIPT_ERROR.search(conformance.output), conformance.output[-4000:]
    print(f"Godot client poll cost per frame: {cost}; conformance run {conformance.wall_s:.1f} s")


@pytest.mark.parametrize("mutation", ["hex", "json"])
def test_runner_fails_on_a_wrong_vector(godot, project, tmp_path, mutation):
    """The vector checks can fail: one wrong byte, or one wrong value, in the spec is caught (exit code 1)."""
    path = wrong_vector_spec(tmp_path, mutation)
    proc = subprocess.run(runner_command(godot, project) + ["--spec", str(path)], capture_output=True, text=True,
                          timeout=120)
    check_wrong_vector_failed(proc)


def test_runner_fails_on_an_unknown_scenario(godot, project, tmp_path):
    spec = {"host": "127.0.0.1", "port": 1, "server": {}, "vectors": load_vectors(),
            "scenarios": [{"name": "no-such-scenario"}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run(runner_command(godot, project) + ["--spec", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "FAIL no-such-scenario" in proc.stdout, proc.stdout + proc.stderr


def test_generate_covers_the_request_field_table():
    """Every field of the bridge's generate (the request field table) is a known generate key of the GDScript
    client, in its typed lists: adding a request field without the client fails here."""
    from gllm.request_fields import BRIDGE_FIELDS
    text = (ADDON / "gllm_client.gd").read_text()
    keys = re.search(r"const GENERATE_KEYS: Array\[String\] = \[(.*?)\]", text, re.S).group(1)
    for f in BRIDGE_FIELDS:
        assert f'"{f.wire_name}"' in keys, f"GENERATE_KEYS lacks {f.wire_name}"


# ------------------------------------------------------------------------------------------ the addon's layout
def test_addon_layout():
    cfg = (ADDON / "plugin.cfg").read_text()
    assert re.search(r'^script="plugin.gd"$', cfg, re.M) and re.search(r"^name=", cfg, re.M)
    for name in ("plugin.gd", "msgpack.gd", "zmtp.gd", "gllm_client.gd", "gllm_npc.gd", "gllm_npc_conversation.gd",
                 "gllm_bridge.gd", "README.md"):
        assert (ADDON / name).is_file(), name
    assert "class_name GllmClient\n" in (ADDON / "gllm_client.gd").read_text()
    npc = (ADDON / "gllm_npc.gd").read_text()
    assert "class_name GllmNpc\nextends Node\n" in npc
    for signal in ("text_received(id: String, delta: String, full: String)", "completed(id: String, info: Dictionary)",
                   "failed(id: String, code: String, message: String)", "connection_changed(connected: bool)"):
        assert f"signal {signal}" in npc, signal


def gd_files() -> list[Path]:
    return sorted([*GODOT_DIR.rglob("*.gd"), *EXAMPLE.rglob("*.gd")])


def test_gdlint_and_gdformat():
    """gdtoolkit 4.x: gdlint with bindings/godot/gdlintrc (the defaults, with 120 columns as gdformat is run, and
    room for the decoders' switch statements), and gdformat --check at 120 columns."""
    gdlint = Path(sys.executable).with_name("gdlint")
    gdformat = Path(sys.executable).with_name("gdformat")
    if not gdlint.exists():
        pytest.skip("gdtoolkit is not installed in this environment (pip install -e '.[dev]')")
    files = [str(p) for p in gd_files()]
    assert len(files) >= 9, files
    lint = subprocess.run([str(gdlint), *files], capture_output=True, text=True, timeout=300, cwd=GODOT_DIR)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([str(gdformat), "--line-length", "120", "--check", *files], capture_output=True, text=True,
                         timeout=300)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


# ------------------------------------------------------------------------------------------ the example project
def example_project(dest: Path) -> Path:
    """examples/godot with the addon copied in, as its README tells a user to do."""
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns(".godot", "addons"))
    shutil.copytree(ADDON, dest / "addons" / "gllm")
    return dest


def test_example_project_runs_headless_against_a_real_server(godot, llama32_dir, tmp_path):
    """The example opens (after an import, as the editor would do), runs headless, and its three NPCs each
    complete a streamed reply from a real server; no script error anywhere in its output."""
    from bridge_doubles import ServerProcess
    proj = example_project(tmp_path / "example")
    imp = subprocess.run([godot, "--headless", "--path", str(proj), "--import"], capture_output=True, text=True,
                         timeout=180)
    assert imp.returncode == 0 and not SCRIPT_ERROR.search(imp.stdout + imp.stderr), imp.stdout + imp.stderr
    server_args = load_scenarios()["server_args"]
    srv = ServerProcess(llama32_dir, *server_args).start()
    try:
        proc = subprocess.run([godot, "--headless", "--path", str(proj), "--", "--autotest", "--host", "127.0.0.1",
                               "--port", str(srv.port), "--line", "Good evening! Any news?"],
                              capture_output=True, text=True, timeout=150)
    finally:
        srv.stop()
    out = proc.stdout + proc.stderr
    print(out)
    assert not SCRIPT_ERROR.search(out), out
    assert proc.returncode == 0, out
    for name in ("Brann", "Lira", "Odo"):
        assert re.search(rf"^NPC {name} completed \((stop|length)\): ", out, re.M), out
    assert "autotest: 3 of 3 NPCs completed a reply" in out, out


def test_example_shows_the_offline_panel_without_a_server(godot, tmp_path):
    """No server: the example runs without script errors and its NPCs fail with "disconnected" (the panel says
    to run gllm serve); the autotest then exits 1, as nothing completed."""
    import socket
    proj = example_project(tmp_path / "example")
    subprocess.run([godot, "--headless", "--path", str(proj), "--import"], capture_output=True, timeout=180)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    proc = subprocess.run([godot, "--headless", "--path", str(proj), "--quit-after", "120", "--", "--host",
                           "127.0.0.1", "--port", str(free), "--autotest-offline"], capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert not SCRIPT_ERROR.search(out), out
    assert f"offline panel: No gllm server at 127.0.0.1:{free}" in out, out
