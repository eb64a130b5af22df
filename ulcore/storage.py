"""One interface for local paths and `s3://bucket/key` URIs: every pipeline output goes through here.

Writes are atomic on both backends, so a reader (or a rerun deciding what is done) never sees half a file:
locally a temp file in the same folder is `os.replace`d onto the target; on S3 an object only becomes visible
once its single PUT or its multipart upload completes. S3 goes through boto3 with retries configured in
botocore (adaptive mode backs off on throttling); the endpoint comes from `AWS_ENDPOINT_URL` so the same code
talks to AWS, MinIO or the moto server the tests start on 127.0.0.1.

Transient errors (throttling, resets, 5xx) are retried; an endpoint that cannot be connected to at all is not
transient: once one request has failed to connect for `storage.unreachable_after_s` seconds it raises
`StorageUnreachable`, naming the endpoint, and nothing retries that (Ray tasks neither), so a lost endpoint ends
the stage in bounded time with one message.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from ulcore.errors import NonRetryableError

S3_PREFIX = "s3://"
# Parts of 64 MiB keep a 1 GB shard to 16 parts (S3 allows 10,000) and bound memory per upload thread.
MULTIPART_THRESHOLD = 64 * 2**20
MULTIPART_CHUNK = 64 * 2**20
RETRY_ATTEMPTS = 10
UNREACHABLE_ENV = "UL_S3_UNREACHABLE_AFTER_S"  # storage.unreachable_after_s, handed to Ray tasks with the AWS_* vars
DEFAULT_UNREACHABLE_AFTER_S = 60.0
CONNECT_RETRY_MAX_SLEEP_S = 5.0

_clients: dict[tuple[int, str], Any] = {}
_clients_lock = threading.Lock()


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def join(root: str, *parts: str) -> str:
    """`join("s3://b/p", "data", "x.tar")` -> `s3://b/p/data/x.tar`; local roots join as paths."""
    root = str(root)
    if is_s3(root):
        pieces = [root.rstrip("/")] + [str(p).strip("/") for p in parts if str(p).strip("/")]
        return "/".join(pieces)
    return os.path.join(root, *[str(p) for p in parts])


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise ValueError(f"{uri!r}: expected an s3://bucket/key URI")
    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: the URI names no bucket")
    return bucket, key


class StorageUnreachable(NonRetryableError):
    """The S3 endpoint refused or timed out every connection for the configured time: not worth retrying."""


def transient_errors() -> list[type[BaseException]]:
    """What a Ray task that reads or writes storage may be retried for: I/O and botocore errors that outlived
    botocore's own retries (throttling, resets, 5xx). Never StorageUnreachable or another NonRetryableError."""
    from botocore.exceptions import BotoCoreError, ClientError

    return [OSError, BotoCoreError, ClientError]


def use_endpoint(url: str, unreachable_after_s: float | None = None) -> None:
    """Point every later S3 call (this process and the Ray tasks it starts) at `url`; "" keeps the current one.
    `unreachable_after_s` (storage.unreachable_after_s) bounds how long a connection is retried."""
    if url:
        os.environ["AWS_ENDPOINT_URL"] = url
    if unreachable_after_s is not None:
        os.environ[UNREACHABLE_ENV] = str(unreachable_after_s)


# Where S3 calls go, not who makes them: safe to hand to a task on any node.
LOCATION_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", UNREACHABLE_ENV)


def s3_env(*, credentials: bool) -> dict[str, str]:
    """The variables that decide where S3 calls go and how long they may fail to connect, handed to Ray tasks whose
    workers may predate them. `credentials` adds this process's AWS_* identity: right for a local Ray instance of
    our own (same machine, same user), wrong on a cluster, where each node has its own (an IRSA pod's
    AWS_WEB_IDENTITY_TOKEN_FILE names a file other nodes do not have)."""
    return {k: v for k, v in os.environ.items()
            if k in LOCATION_ENV or (credentials and k.startswith("AWS_"))}


def arrow_filesystem() -> Any:
    """A pyarrow S3 filesystem for the current endpoint (Ray Train's checkpoint storage). Credentials are not
    passed: each process resolves its own from its environment or instance role, so none travel with the object.
    A checkpoint upload retries throttling and 5xx answers as often as boto3 does here (pyarrow's default is 3
    attempts); what still fails ends the training attempt, which Ray Train restarts from the newest checkpoint."""
    from pyarrow import fs

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return fs.S3FileSystem(endpoint_override=os.environ.get("AWS_ENDPOINT_URL") or None, region=region,
                           retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=RETRY_ATTEMPTS))


def _endpoint_name() -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3 (no AWS_ENDPOINT_URL set)"


def _bound_connection_retries(budget_s: float) -> Any:
    """A botocore `needs-retry` hook, run before botocore's own: connection failures are retried with short
    sleeps until `budget_s` has passed since the request's first one, then become StorageUnreachable; every other
    outcome is left to botocore's retry policy."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    def hook(caught_exception: Exception | None = None, attempts: int = 1, request_dict: dict | None = None,
             **_: Any) -> float | None:
        if not isinstance(caught_exception, (EndpointConnectionError, ConnectTimeoutError)):
            return None
        context = (request_dict or {}).setdefault("context", {})
        first = context.setdefault("ul_connect_failed_since", time.monotonic())
        waited = time.monotonic() - first
        if waited >= budget_s:
            raise StorageUnreachable(
                f"S3 endpoint {_endpoint_name()} unreachable: no connection for {waited:.0f} s "
                f"({caught_exception}). Check that the server is running and that storage.s3_endpoint / "
                f"AWS_ENDPOINT_URL names it (host and port); storage.unreachable_after_s = {budget_s:g} sets this "
                "limit") from None
        return min(CONNECT_RETRY_MAX_SLEEP_S, 0.2 * 2 ** attempts * random.uniform(0.5, 1.0), budget_s - waited)

    return hook


def client() -> Any:
    """A boto3 S3 client for the current endpoint, one per process (clients must not cross a fork)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    budget_s = float(os.environ.get(UNREACHABLE_ENV) or DEFAULT_UNREACHABLE_AFTER_S)
    cache_key = (os.getpid(), f"{endpoint}|{os.environ.get('AWS_ACCESS_KEY_ID', '')}|{budget_s}")
    with _clients_lock:
        if cache_key not in _clients:
            import boto3
            from botocore.config import Config as BotoConfig

            boto_cfg = BotoConfig(retries={"max_attempts": RETRY_ATTEMPTS, "mode": "adaptive"},
                                  connect_timeout=min(10.0, budget_s), read_timeout=120, max_pool_connections=32)
            s3 = boto3.client("s3", endpoint_url=endpoint or None, config=boto_cfg)
            s3.meta.events.register_first("needs-retry.s3", _bound_connection_retries(budget_s))
            _clients[cache_key] = s3
        return _clients[cache_key]


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                          max_concurrency=4, use_threads=True)


def _is_missing(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return os.path.exists(uri)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _is_missing(exc):
            return False
        raise


def read_bytes(uri: str) -> bytes:
    """Whole object; a missing one raises FileNotFoundError naming the URI on both backends."""
    if not is_s3(uri):
        with open(uri, "rb") as f:
            return f.read()
    with open_read(uri) as body:
        return body.read()


def open_read(uri: str) -> IO[bytes]:
    """A binary stream (for tar readers): a local file, or the S3 object's streaming body."""
    if not is_s3(uri):
        return open(uri, "rb")
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        if _is_missing(exc):
            raise FileNotFoundError(f"{uri}: no such S3 object") from exc
        raise


def _atomic_local(path: str) -> tuple[int, str]:
    """A temp file beside `path` (same filesystem, so os.replace is atomic); dot-prefixed so listings skip it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")


def _umask() -> int:
    """This process's umask, read without changing it (Linux reports it in /proc; elsewhere set and restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_local(tmp: str, target: str) -> None:
    """Rename a finished temp file or folder onto `target` with the mode a plain open() / mkdir would have given it
    (0o666 / 0o777 less the umask): mkstemp and mkdtemp create owner-only entries that other accounts on shared
    storage could not read."""
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~_umask())
    os.replace(tmp, target)


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        # upload_fileobj switches to a multipart upload above the threshold; either way the object appears whole.
        client().upload_fileobj(io.BytesIO(data), bucket, key, Config=_transfer_config())
        return
    fd, tmp = _atomic_local(uri)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish_local(tmp, uri)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def upload_file(local_path: str, uri: str) -> None:
    """Copy a finished local file to `uri` (multipart on S3 for large files); the target appears complete."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client().upload_file(str(local_path), bucket, key, Config=_transfer_config())
        return
    if os.path.abspath(local_path) == os.path.abspath(uri):
        return
    _atomic_copy(uri, lambda tmp: shutil.copyfile(local_path, tmp))


def _atomic_copy(target: str, fill: Any) -> None:
    """Write `target` through a temp file in its folder that `fill(tmp)` fills, then rename: never a partial file."""
    fd, tmp = _atomic_local(target)
    os.close(fd)
    try:
        fill(tmp)
        publish_local(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def download_file(uri: str, local_path: str) -> None:
    """Copy `uri` to a local file, atomically (an interrupted download leaves no partial file)."""

    def fetch(tmp: str) -> None:
        if not is_s3(uri):
            shutil.copyfile(uri, tmp)
            return
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            client().download_file(bucket, key, tmp, Config=_transfer_config())
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"{uri}: no such S3 object") from exc
            raise

    _atomic_copy(str(local_path), fetch)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_text(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON ({exc})") from exc


def write_json(uri: str, value: Any) -> None:
    write_text(uri, json.dumps(value, indent=2, sort_keys=True) + "\n")


def list_uris(prefix: str, suffix: str = "") -> list[str]:
    """Every file below the folder `prefix` (recursive) whose name ends in `suffix`, sorted.

    `prefix` names a folder on both backends: `s3://b/train` does not match `s3://b/train2/...`. Temp files of
    unfinished local writes are skipped.
    """
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key.strip("/") else ""
        found = []
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(suffix) and not obj["Key"].endswith("/"):
                    found.append(f"{S3_PREFIX}{bucket}/{obj['Key']}")
        return sorted(found)
    if not os.path.isdir(prefix):
        return []
    found = []
    for folder, dirs, files in os.walk(prefix):
        dirs.sort()
        for name in files:
            if name.endswith(suffix) and not (name.startswith(".") and name.endswith(".tmp")):
                found.append(os.path.join(folder, name))
    return sorted(found)


def list_objects(prefix: str) -> list[tuple[str, int, str]]:
    """(URI, size in bytes, ETag) of every object below the S3 folder `prefix`, sorted by URI: what one
    ListObjectsV2 pass returns, with no request per object (the raw-data manifest of ulcore.data.manifest)."""
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key.strip("/") else ""
    found = []
    for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                found.append((f"{S3_PREFIX}{bucket}/{obj['Key']}", int(obj["Size"]), str(obj["ETag"]).strip('"')))
    return sorted(found)


def remove(uri: str) -> None:
    """Delete a file, or a folder and everything below it; a missing target is not an error."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3 = client()
        s3.delete_object(Bucket=bucket, Key=key)
        keys = [split_s3(u)[1] for u in list_uris(uri)] if key else []
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]]})
        return
    path = Path(uri)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        _unlink_quietly(str(path))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = [
    "is_s3", "join", "split_s3", "StorageUnreachable", "transient_errors", "use_endpoint", "s3_env", "client",
    "exists", "read_bytes", "open_read", "write_bytes", "upload_file", "download_file", "read_text", "write_text",
    "read_json", "write_json", "list_uris", "list_objects", "remove", "publish_local",
]
