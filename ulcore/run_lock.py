"""One run of a stage per storage root at a time: a second one refuses at once, naming the run that holds the lock.

Two runs of one stage on one root would write the same checkpoint folder and delete each other's files. The lock
is `<storage.root>/locks/<stage>.lock`, holding the owner's host, pid and start time:

- local roots: `fcntl.flock` on that file. The kernel drops the lock when its process dies, however it dies, so a
  crashed run never blocks a rerun (the file's stale text is simply overwritten by the next owner);
- S3 roots: a lease. The object is created with a conditional PUT (`If-None-Match: *`, which S3 guarantees to
  succeed for one writer only) and carries an expiry time that a heartbeat thread pushes forward every third of
  `LEASE_S`. A lock whose expiry has passed belonged to a run that died without releasing it: it is taken over by a
  PUT conditional on its ETag (`If-Match`), so of two runs reclaiming it at once only one wins. Clocks of the
  machines sharing a root must agree to well within `LEASE_S`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from ulcore import layout, storage

LEASE_S = 60.0  # an S3 lock not renewed for this long is stale


class StageLocked(RuntimeError):
    """Another run of the same stage holds the storage root's lock."""


def lock_uri(root: str, stage: str) -> str:
    return layout.lock(root, stage)


def _owner(stage: str, lease_s: float | None = None) -> dict[str, Any]:
    now = time.time()
    owner = {"stage": stage, "host": socket.gethostname(), "pid": os.getpid(),
             "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds")}
    if lease_s is not None:
        owner["expires"] = now + lease_s
    return owner


def _refusal(uri: str, owner: dict[str, Any]) -> StageLocked:
    return StageLocked(
        f"{uri}: stage {owner.get('stage', '?')} is already running on this storage root (host "
        f"{owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {owner.get('started', '?')}); wait for it "
        "to finish or stop it, then rerun (a run that died releases its lock by itself)")


@contextlib.contextmanager
def stage_lock(root: str, stage: str, *, lease_s: float = LEASE_S) -> Iterator[None]:
    """Hold `<root>/locks/<stage>.lock` for the body, or raise StageLocked naming its holder."""
    uri = lock_uri(root, stage)
    if storage.is_s3(uri):
        with _s3_lock(uri, stage, lease_s):
            yield
    else:
        with _local_lock(uri, stage):
            yield


@contextlib.contextmanager
def _local_lock(path: str, stage: str) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                owner = {}
            raise _refusal(path, {"stage": stage, **owner}) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_owner(stage)) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the flock


def _is_precondition_failure(exc: Exception) -> bool:
    """412 (the condition failed) or 409 (a concurrent conditional write to the same key is in progress)."""
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


@contextlib.contextmanager
def _s3_lock(uri: str, stage: str, lease_s: float) -> Iterator[None]:
    from botocore.exceptions import ClientError

    bucket, key = storage.split_s3(uri)
    s3 = storage.client()

    def put(**condition: str) -> str:
        body = json.dumps(_owner(stage, lease_s)).encode()
        return s3.put_object(Bucket=bucket, Key=key, Body=body, **condition)["ETag"]

    try:
        etag = put(IfNoneMatch="*")
    except ClientError as exc:
        if not _is_precondition_failure(exc):
            raise
        held = s3.get_object(Bucket=bucket, Key=key)
        owner = json.loads(held["Body"].read() or b"{}")
        if float(owner.get("expires", 0)) > time.time():
            raise _refusal(uri, owner) from None
        try:  # the owner stopped renewing: take the lock over, unless another run just did
            etag = put(IfMatch=held["ETag"])
        except ClientError as again:
            if _is_precondition_failure(again):
                raise _refusal(uri, json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())) from None
            raise
        print(f"[lock] took over the stale lock {uri} of host {owner.get('host')}, pid {owner.get('pid')} "
              f"(not renewed since {lease_s:g} s before its expiry)", flush=True)

    stop = threading.Event()
    current = {"etag": etag}

    def heartbeat() -> None:
        while not stop.wait(lease_s / 3):
            try:
                current["etag"] = put(IfMatch=current["etag"])
            except ClientError as exc:
                print(f"[lock] could not renew {uri}: {exc}", flush=True)

    thread = threading.Thread(target=heartbeat, name=f"lock-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(ClientError):  # already taken over: leave the new owner's lock alone
            s3.delete_object(Bucket=bucket, Key=key, IfMatch=current["etag"])


__all__ = ["StageLocked", "stage_lock", "lock_uri", "LEASE_S"]
