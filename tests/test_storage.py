"""ulcore.storage on a local folder and against a real S3 endpoint (moto on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest

from ulcore import storage


def _roundtrip(root: str) -> None:
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"\x00\x01payload")
    storage.write_text(storage.join(root, "a", "b", "y.txt"), "héllo")
    storage.write_json(storage.join(root, "a2", "z.json"), {"k": [1, 2]})
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"\x00\x01payload"
    assert storage.read_text(storage.join(root, "a", "b", "y.txt")) == "héllo"
    assert storage.read_json(storage.join(root, "a2", "z.json")) == {"k": [1, 2]}
    with storage.open_read(storage.join(root, "a", "x.bin")) as f:
        assert f.read(2) == b"\x00\x01"
    # a folder prefix never matches a sibling folder that merely starts with the same name
    assert storage.list_uris(storage.join(root, "a")) == [storage.join(root, "a", "b", "y.txt"),
                                                           storage.join(root, "a", "x.bin")]
    assert storage.list_uris(storage.join(root, "a"), suffix=".bin") == [storage.join(root, "a", "x.bin")]
    assert storage.exists(storage.join(root, "a", "x.bin"))
    assert not storage.exists(storage.join(root, "a", "nope"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "a", "nope"))
    storage.remove(storage.join(root, "a"))
    assert storage.list_uris(storage.join(root, "a")) == []
    assert storage.list_uris(storage.join(root, "a2")) == [storage.join(root, "a2", "z.json")]
    storage.remove(storage.join(root, "missing-is-fine"))


def test_local_roundtrip_and_atomic_writes(tmp_path):
    _roundtrip(str(tmp_path))
    storage.write_bytes(str(tmp_path / "f"), b"1")
    storage.write_bytes(str(tmp_path / "f"), b"2")  # overwrite goes through a temp file + rename
    assert (tmp_path / "f").read_bytes() == b"2"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_local_listing_skips_unfinished_temp_files(tmp_path):
    (tmp_path / ".x.tar.123.tmp").write_bytes(b"partial")
    (tmp_path / "x.tar").write_bytes(b"done")
    assert storage.list_uris(str(tmp_path)) == [str(tmp_path / "x.tar")]


def test_join_and_split():
    assert storage.join("s3://b/p/", "/data/", "x.tar") == "s3://b/p/data/x.tar"
    assert storage.split_s3("s3://bucket/a/b") == ("bucket", "a/b")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3("s3:///key")


@pytest.mark.slow
def test_s3_roundtrip(s3_bucket):
    _roundtrip(s3_bucket + "/prefix")


@pytest.mark.slow
def test_s3_multipart_upload_and_download(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 2**20)  # S3's minimum part size
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 2**20)
    data = os.urandom(11 * 2**20)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    uri = s3_bucket + "/big/big.bin"
    storage.upload_file(str(local), uri)
    bucket, key = storage.split_s3(uri)
    etag = storage.client().head_object(Bucket=bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart ETag names its part count: 11 MiB / 5 MiB parts
    storage.download_file(uri, str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    storage.write_bytes(s3_bucket + "/big/bytes.bin", data)  # the in-memory path is multipart too
    assert storage.read_bytes(s3_bucket + "/big/bytes.bin") == data
    with pytest.raises(FileNotFoundError, match="no such S3 object"):
        storage.download_file(s3_bucket + "/big/nope", str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()


def test_published_files_and_folders_get_the_usual_mode(tmp_path):
    """Temp files are owner-only (mkstemp); what is renamed into place gets 0o666 / 0o777 less the umask."""
    from ulcore.data.shards import write_shard

    old = os.umask(0o022)
    try:
        storage.write_bytes(str(tmp_path / "a.bin"), b"x")
        storage.upload_file(str(tmp_path / "a.bin"), str(tmp_path / "copy" / "b.bin"))
        stats = write_shard(str(tmp_path / "shards" / "train-000000.tar"), [{"__key__": "k", "cls": 1}])
        staging = tmp_path / ".staging"
        staging.mkdir(mode=0o700)
        storage.publish_local(str(staging), str(tmp_path / "published"))
        os.umask(0o027)
        storage.write_bytes(str(tmp_path / "private.bin"), b"x")
    finally:
        os.umask(old)
    assert stats["samples"] == 1
    for name in ("a.bin", "copy/b.bin", "shards/train-000000.tar", "shards/train-000000.stats.json"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o644), name
    assert oct((tmp_path / "published").stat().st_mode & 0o777) == oct(0o755)
    assert oct((tmp_path / "private.bin").stat().st_mode & 0o777) == oct(0o640)


def test_checkpoint_uploads_outlast_throttling(s3_bucket, monkeypatch):
    """Ray Train writes checkpoints through storage.arrow_filesystem(): six throttled PUTs in a row (more than
    pyarrow's default three attempts survive) still end in an intact object."""
    from tests.flaky_s3 import flaky_s3

    payload = os.urandom(4096)
    bucket, _ = storage.split_s3(s3_bucket + "/x")
    with flaky_s3(os.environ["AWS_ENDPOINT_URL"], fail_puts=6) as (url, counts):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        with storage.arrow_filesystem().open_output_stream(f"{bucket}/ckpt/state.pt") as out:
            out.write(payload)
        assert counts == {"puts": 7, "refused": 6}
        assert storage.arrow_filesystem().open_input_stream(f"{bucket}/ckpt/state.pt").read() == payload
