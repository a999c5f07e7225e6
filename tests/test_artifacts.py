"""Artifact store: versions, atomic publish, manifests with checksums, failures that leave nothing."""

from __future__ import annotations

import pytest

from storage.artifacts import ArtifactError, ArtifactStore, atomic_file, stable_hash, write_text_atomic


def test_version_is_a_stable_hash_of_the_inputs():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_publish_writes_files_and_a_manifest_with_checksums(tmp_path):
    store = ArtifactStore(tmp_path)

    def build(folder):
        (folder / "data.txt").write_text("hello")
        (folder / "sub").mkdir()
        (folder / "sub" / "x.bin").write_bytes(b"\x00\x01")
        return {"rows": 2}

    manifest = store.publish("stage", "v1", build, inputs={"up": "v0"}, config={"k": 1}, code="abc")
    assert store.exists("stage", "v1") and store.latest("stage") == "v1"
    assert {f.path: f.bytes for f in manifest.files} == {"data.txt": 5, "sub/x.bin": 2}
    assert manifest.metrics == {"rows": 2} and manifest.inputs == {"up": "v0"}
    assert store.verify("stage", "v1") == []
    (store.path("stage", "v1") / "data.txt").write_text("HELLO")
    assert store.verify("stage", "v1") == ["data.txt"]


def test_an_existing_version_is_not_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []
    store.publish("stage", "v1", lambda folder: calls.append(1) or {})
    store.publish("stage", "v1", lambda folder: calls.append(1) or {})
    assert calls == [1]


def test_a_failing_build_publishes_nothing_and_keeps_what_was_there(tmp_path):
    store = ArtifactStore(tmp_path)
    store.publish("stage", "good", lambda folder: (folder / "f").write_text("ok") and {})

    def explode(folder):
        (folder / "half").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.publish("stage", "bad", explode)
    assert not store.exists("stage", "bad")
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["good", "latest"]
    assert store.latest("stage") == "good" and store.verify("stage", "good") == []


def test_root_that_is_a_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ArtifactError, match="storage.root"):
        ArtifactStore(blocker / "root").ensure_writable()


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "state.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
