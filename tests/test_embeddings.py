"""Embedding files (what `fundus-sdk embed` writes and `index add` reads): both formats round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from fundus_sdk import Embeddings, read_embeddings, write_embeddings
from fundus_sdk.embeddings import EmbeddingFileError


def sample(n: int = 3, dim: int = 8) -> Embeddings:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return Embeddings(v, [f"p{i}.jpg" for i in range(n)], [f"{i:064x}" for i in range(n)], "ab" * 32, "m 1.0")


@pytest.mark.parametrize("name", ["e.npz", "e.jsonl"])
def test_round_trip(tmp_path, name):
    written = sample()
    path = write_embeddings(tmp_path / name, written)
    back = read_embeddings(path)
    assert np.allclose(back.vectors, written.vectors) and back.vectors.dtype == np.float32
    assert back.paths == written.paths and back.sha256 == written.sha256
    assert back.model_fingerprint == written.model_fingerprint
    assert not [p for p in tmp_path.iterdir() if p.name != name]  # no temporary file left


def test_an_npz_of_something_else_names_what_is_missing(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(EmbeddingFileError, match="other.npz: .*missing vectors, paths, sha256, model_fingerprint"):
        read_embeddings(tmp_path / "other.npz")


def test_a_broken_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(EmbeddingFileError, match="bad.npz: not a readable embedding file"):
        read_embeddings(tmp_path / "bad.npz")


def test_an_npy_named_npz_and_a_folder_named_npz_are_clear_errors(tmp_path):
    with open(tmp_path / "x.npz", "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(EmbeddingFileError, match="x.npz: a single array"):
        read_embeddings(tmp_path / "x.npz")
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(EmbeddingFileError, match="d.npz: not a readable embedding file"):
        read_embeddings(tmp_path / "d.npz")


def test_arrays_embed_would_not_write_are_refused_before_they_are_loaded(tmp_path):
    good = {"sha256": np.array(["0" * 64]), "model_fingerprint": np.array("f" * 64)}
    cases = {  # small files that would inflate (the first to 100 MB) or do not fit together
        "long.npz": {"vectors": np.zeros((100_000, 256), np.float32), "paths": np.array(["a.jpg"])},
        "wide.npz": {"vectors": np.zeros((1, 256), np.float32), "paths": np.array(["a" * 2_000_000])},
        "text.npz": {"vectors": np.array([["1"] * 256]), "paths": np.array(["a.jpg"])},
        "extra.npz": {"vectors": np.zeros((1, 256), np.float32), "paths": np.array(["a.jpg"]), "x": np.zeros(9)},
    }
    for name, arrays in cases.items():
        np.savez_compressed(tmp_path / name, **good, **arrays)
        assert (tmp_path / name).stat().st_size < 200_000
        with pytest.raises(EmbeddingFileError, match=rf"{name}: array '\w+' of shape .* does not belong"):
            read_embeddings(tmp_path / name)
    np.savez(tmp_path / "zero.npz", **good, vectors=np.zeros((1, 256), np.float32), paths=np.array(["a.jpg"]))
    with pytest.raises(EmbeddingFileError, match=r"zero.npz: vector 0 \(a.jpg\) is not a finite unit vector"):
        read_embeddings(tmp_path / "zero.npz")


def test_the_name_decides_the_format_or_the_write_is_refused(tmp_path):
    for name in ("x.csv", "x.json", "x"):
        with pytest.raises(ValueError, match="cannot tell the format"):
            write_embeddings(tmp_path / name, sample())
    with pytest.raises(ValueError, match="the name says npz"):
        write_embeddings(tmp_path / "x.npz", sample(), fmt="jsonl")
    assert list(tmp_path.iterdir()) == []


def test_a_target_that_is_not_a_regular_file_is_never_replaced(tmp_path):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_embeddings(tmp_path / "d.npz", sample())
    assert (tmp_path / "d.npz").is_dir()
    link = tmp_path / "out.npz"
    link.symlink_to(tmp_path / "target.npz")  # a link to a file not made yet: the file is made, the link kept
    write_embeddings(link, sample())
    assert link.is_symlink() and len(np.load(tmp_path / "target.npz")["vectors"]) == len(sample().vectors)
