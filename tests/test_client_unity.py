"""The Unity client (bindings/unity/com.gllm.bridge), compiled with Debian Mono's mcs at C# 7.2 and run with mono
against a real `gllm serve` on the tiny model, through the cross-client conformance harness (tests/clients).

- the engine-free core compiles warning-free (-warnaserror) at C# 7.2 and uses no UnityEngine, reflection or
  `dynamic` (what IL2CPP and Godot .NET need);
- the Unity layer and the sample compile against a small test-only stub of the UnityEngine types they use
  (Tests~/UnityStub): this catches type errors in our code, not drift from the real Unity API;
- the package is laid out as Unity needs it (package.json, a .meta with a unique GUID for every asset, the
  sample scene pointing at the bootstrap script's GUID);
- every scenario of tests/clients/scenarios.json passes against the real server (one test each), and the runner
  does fail when a test vector is wrong.

Mono comes from `make client-deps` (tools/setup_mono.sh); without it these tests skip and say so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
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
PKG = ROOT / "bindings" / "unity" / "com.gllm.bridge"
CORE = sorted((PKG / "Runtime" / "Core").glob("*.cs"))
UNITY = sorted((PKG / "Runtime" / "Unity").glob("*.cs"))
SAMPLE = sorted((PKG / "Samples~" / "NpcDialogue").glob("*.cs"))
STUB = PKG / "Tests~" / "UnityStub" / "UnityEngine.cs"
RUNNER = PKG / "Tests~" / "Conformance" / "Conformance.cs"
CSHARP = ["-langversion:7.2", "-warnaserror", "-warn:4"]


@pytest.fixture(scope="module")
def mono() -> dict[str, str]:
    tools = {name: shutil.which(name) for name in ("mcs", "mono")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"Mono is not installed ({', '.join(missing)} missing): run `make client-deps` "
                    f"(tools/setup_mono.sh installs Debian's mono-mcs and mono-runtime as root)")
    return tools  # type: ignore[return-value]


def mcs(mono: dict[str, str], out: Path, sources: list[Path], *flags: str, refs: tuple[Path, ...] = ()) -> Path:
    target = ["-target:exe"] if out.suffix == ".exe" else ["-target:library"]
    cmd = [mono["mcs"], *flags, *target, f"-out:{out}", *[f"-r:{r}" for r in refs], *map(str, sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="module")
def build(mono, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("unity-build")


@pytest.fixture(scope="module")
def core_dll(mono, build) -> Path:
    return mcs(mono, build / "Gllm.Core.dll", CORE, *CSHARP)


@pytest.fixture(scope="module")
def unity_stub(mono, build) -> Path:
    return mcs(mono, build / "UnityEngine.dll", [STUB], "-langversion:7.2")


@pytest.fixture(scope="module")
def runner(mono, build, core_dll) -> Path:
    return mcs(mono, build / "Conformance.exe", [RUNNER], *CSHARP, refs=(core_dll, Path("System.Core.dll")))


# ------------------------------------------------------------------------------------------ compiling
def test_core_compiles_warning_free_at_csharp_7_2(core_dll):
    assert core_dll.stat().st_size > 0


def test_core_is_engine_free_and_il2cpp_safe():
    asmdef = json.loads((PKG / "Runtime" / "Core" / "Gllm.Core.asmdef").read_text())
    assert asmdef["noEngineReferences"] is True and asmdef["name"] == "Gllm.Core"
    for src in CORE:
        code = re.sub(r"//[^\n]*", "", src.read_text())   # comments may name anything
        for banned in ("UnityEngine", "System.Reflection", "Reflection.Emit", "dynamic ", "unsafe ", "DllImport"):
            assert banned not in code, f"{src.name} uses {banned}"


@pytest.mark.parametrize("defines", [["-define:UNITY_5_3_OR_NEWER"], ["-define:UNITY_5_3_OR_NEWER;UNITY_EDITOR"]],
                         ids=["player", "editor"])
def test_unity_layer_compiles_against_the_stub(mono, build, core_dll, unity_stub, defines):
    name = "Gllm.Unity" + ("-editor" if "UNITY_EDITOR" in defines[0] else "")
    mcs(mono, build / f"{name}.dll", UNITY, *CSHARP, *defines, refs=(core_dll, unity_stub))


@pytest.mark.parametrize("version_define", ["", ";UNITY_2022_2_OR_NEWER"], ids=["unity2021", "unity2022.2"])
def test_sample_compiles_against_the_stub(mono, build, core_dll, unity_stub, version_define):
    unity = mcs(mono, build / "Gllm.Unity.dll", UNITY, *CSHARP, "-define:UNITY_5_3_OR_NEWER",
                refs=(core_dll, unity_stub))
    mcs(mono, build / "Sample.dll", SAMPLE, *CSHARP, f"-define:UNITY_5_3_OR_NEWER{version_define}",
        refs=(core_dll, unity_stub, unity))


def test_package_layout():
    pkg = json.loads((PKG / "package.json").read_text())
    assert pkg["name"] == "com.gllm.bridge" and pkg["unity"] == "2021.3"
    for sample in pkg["samples"]:
        assert (PKG / sample["path"]).is_dir(), sample
    guids: dict[str, Path] = {}
    for path in sorted(PKG.rglob("*")):
        rel = path.relative_to(PKG)
        if path.suffix == ".meta" or "Tests~" in rel.parts:
            continue
        hidden = any(part.endswith("~") for part in rel.parts)
        if hidden and (path.is_dir() or rel.parts[0] != "Samples~"):
            continue    # Unity ignores ~ folders; files of a sample keep metas for their GUIDs when imported
        meta = path.with_name(path.name + ".meta")
        assert meta.exists(), f"{rel} has no .meta: Unity ignores assets without one in an immutable package"
        guid = re.search(r"^guid: ([0-9a-f]{32})$", meta.read_text(), re.M).group(1)
        assert guid not in guids, f"{rel} and {guids[guid]} share the GUID {guid}"
        guids[guid] = rel
    for meta in PKG.rglob("*.meta"):
        assert meta.with_name(meta.name[:-5]).exists(), f"{meta} is left over"
    script_guid = re.search(r"^guid: (\w+)", (PKG / "Samples~/NpcDialogue/NpcDialogueBootstrap.cs.meta").read_text(),
                            re.M).group(1)
    assert f"guid: {script_guid}, type: 3" in (PKG / "Samples~/NpcDialogue/NpcDialogue.unity").read_text()


# ------------------------------------------------------------------------------------------ conformance
@pytest.fixture(scope="module")
def conformance(mono, runner, llama32_dir, tmp_path_factory):
    run = ConformanceRun(llama32_dir, tmp_path_factory.mktemp("unity-conformance"))
    result = run.run([mono["mono"], "--debug", str(runner)], timeout_s=540)
    print(result.output)
    return result


def test_scenario_list_and_vectors():
    data = load_scenarios()
    names = [s["name"] for s in data["scenarios"]]
    assert len(names) == len(set(names)) and "vectors" in names and "server-restart" in names
    vectors = {v["name"] for v in load_vectors()}
    assert {"zmtp-greeting", "zmtp-client-opening", "hello", "generate-messages", "done", "error-noid"} <= vectors


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_scenario(conformance, name):
    assert conformance.passed(name), conformance.detail(name)


def test_every_scenario_reported_once_and_the_summary_line(conformance):
    cost = check_complete_run(conformance)
    print(f"Unity client Poll cost per frame: {cost}; conformance run {conformance.wall_s:.1f} s")


@pytest.mark.parametrize("mutation", ["hex", "json"])
def test_runner_fails_on_a_wrong_vector(mono, runner, tmp_path, mutation):
    """The vector checks can fail: one wrong byte, or one wrong value, in the spec is caught."""
    path = wrong_vector_spec(tmp_path, mutation)
    proc = subprocess.run([mono["mono"], str(runner), "--spec", str(path)], capture_output=True, text=True, timeout=120)
    check_wrong_vector_failed(proc)


def test_generate_options_cover_the_request_field_table():
    """Every field of the bridge's generate (the request field table) is a typed GenerateOptions member, named
    in C#'s habit: adding a request field without the client fails here."""
    from gllm.request_fields import BRIDGE_FIELDS
    text = (PKG / "Runtime" / "Core" / "Protocol.cs").read_text()
    for f in BRIDGE_FIELDS:
        pascal = "".join(part.capitalize() for part in f.wire_name.split("_"))
        assert re.search(rf"public [\w<>?]+ {pascal};", text), f"GenerateOptions has no {pascal} ({f.wire_name})"
