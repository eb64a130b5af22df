"""Kinetics-layout sharding: fps/size normalisation, webm, bad clips by reason, npy vs mp4 clip storage."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest

from shard_fixtures import CLIP_FPS, CLIP_FRAMES, CLIP_RES, LABELS, video_cfg
from ulcore.data import kinetics, loaders
from ulcore.data.shards import Item, SampleError
from ulcore.data.sharding import run_shard
from ulcore.data.video import decode_clip, write_video


@pytest.fixture(scope="module")
def npy_run(ray_session, kinetics_tree, tmp_path_factory):
    raw, expected = kinetics_tree
    out = tmp_path_factory.mktemp("kin-out")
    cfg = video_cfg(str(raw), str(out))
    return cfg, run_shard(cfg), expected, out


def test_counts_reasons_and_classes(npy_run):
    cfg, summary, expected, out = npy_run
    for split in ("train", "val"):
        assert summary["splits"][split]["samples"] == expected[split]["samples"]
        assert summary["splits"][split]["rejected_by_reason"] == expected[split]["reasons"]
        assert summary["splits"][split]["ignored"] == expected[split]["ignored"]
    assert [c["name"] for c in summary["classes"]] == sorted(LABELS)  # quotes, commas, parentheses kept
    reasons = {os.path.basename(r["path"]).split("_")[0]: r["reason"] for r in summary["rejected"]}
    assert reasons == {"missing0000": "missing", "tooshort000": "too_short", "broken00000": "undecodable",
                       "emptyclip00": "empty"}


def test_clips_have_fixed_shape_and_labels(npy_run):
    cfg, summary, expected, out = npy_run
    uris = loaders.shard_uris(cfg, "images", "train")
    assert len(uris) == 3  # train-000000 held only the broken and the empty clip: finished but not listed
    with tarfile.open(uris[0]) as tf:
        assert {n.rsplit(".", 1)[1] for n in tf.getnames()} == {"npy", "cls", "json"}
    batch = next(loaders.eval_batches(uris, batch_size=16, kind="images"))
    assert batch["x"].shape == (expected["train"]["samples"], 3, CLIP_FRAMES, CLIP_RES, CLIP_RES)
    assert batch["x"].dtype.is_floating_point is False
    keys = batch["key"]
    assert "webmclip000_000010_000020" in keys
    label_of = {k: summary["classes"][int(c)]["name"] for k, c in zip(keys, batch["cls"])}
    assert label_of["good0000000_000010_000020"] == LABELS[0] and label_of["webmclip000_000010_000020"] == LABELS[1]
    # the moving square makes consecutive frames differ: frames were really cut from the clip, not repeated
    clip = batch["x"][keys.index("good0000001_000010_000020")].float()
    assert (clip[:, 1] - clip[:, 0]).abs().mean() > 0.5


def test_mp4_storage_decodes_close_to_npy(npy_run, tmp_path):
    cfg, summary, expected, out = npy_run
    mp4_cfg = video_cfg(cfg.data.root, str(tmp_path), "video.clip_format=mp4")
    assert run_shard(mp4_cfg)["splits"]["train"]["samples"] == expected["train"]["samples"]
    uris = loaders.shard_uris(mp4_cfg, "images", "train")
    with tarfile.open(uris[0]) as tf:
        assert {n.rsplit(".", 1)[1] for n in tf.getnames()} == {"mp4", "cls", "json"}
    mp4 = next(loaders.eval_batches(uris, batch_size=16, kind="images"))
    npy = next(loaders.eval_batches(loaders.shard_uris(cfg, "images", "train"), batch_size=16, kind="images"))
    assert mp4["key"] == npy["key"] and mp4["x"].shape == npy["x"].shape
    assert (mp4["x"].float() - npy["x"].float()).abs().mean() < 6.0  # lossy yuv420p, close to the npy frames


def test_ffmpeg_timeout_is_a_reject(kinetics_tree):
    raw, _ = kinetics_tree
    path = str(raw / "videos/train/good0000000_000010_000020.mp4")
    with pytest.raises(SampleError) as err:
        decode_clip(path, fps=8.0, resolution=16, frames=4, timeout_s=1e-4)
    assert err.value.reason == "timeout" and path in err.value.detail
    frames = decode_clip(path, fps=8.0, resolution=16, frames=4, timeout_s=30)
    assert frames.shape == (4, 16, 16, 3)


def test_annotation_names_are_configurable(ray_session, kinetics_tree, tmp_path):
    raw, expected = kinetics_tree
    renamed = tmp_path / "raw"
    os.symlink(raw / "videos", tmp_path / "videos_target")
    (renamed / "annotations").mkdir(parents=True)
    (renamed / "annotations" / "kinetics600_val.csv").write_text((raw / "annotations/validate.csv").read_text())
    (renamed / "videos").mkdir()
    os.symlink(raw / "videos/validate", renamed / "videos/val")
    cfg = video_cfg(str(renamed), str(tmp_path / "out"), "data.splits=[val]",
                    "video.annotations={val: kinetics600_val.csv}", "video.video_dirs={val: val}")
    summary = run_shard(cfg)
    assert summary["splits"]["val"]["samples"] == expected["val"]["samples"]


def _ramp_clip(path, seconds: float, fps: float = 25.0) -> None:
    """A clip whose grey level is 40 x its time in seconds: a frame's value says when it was cut."""
    frames = int(seconds * fps)
    values = np.round(np.arange(frames) / fps * 40).astype(np.uint8)
    write_video(np.broadcast_to(values[:, None, None, None], (frames, 32, 48, 3)).copy(), str(path), fps=fps)


@pytest.mark.parametrize("position", ["centre", "start"])
def test_frames_are_cut_from_the_centre_of_the_annotated_segment(tmp_path, position):
    path = tmp_path / "ramp_000010_000014.mp4"
    _ramp_clip(path, 4.0)
    cfg = video_cfg(str(tmp_path), str(tmp_path / "out"), f"video.clip_position={position}")
    item = Item("ramp", str(path), 0, (("time_start", 10), ("time_end", 14)))
    sample = kinetics.make_sample(item, cfg=cfg)
    span = CLIP_FRAMES / CLIP_FPS  # 0.5 s of frames out of a 4 s segment
    start = (4.0 - span) / 2 if position == "centre" else 0.0
    assert sample["json"]["start_s"] == pytest.approx(start)
    grey = sample["npy"][..., 0].mean(axis=(1, 2))
    expected = (start + np.arange(CLIP_FRAMES) / CLIP_FPS) * 40
    np.testing.assert_allclose(grey, expected, atol=3.0)  # ±3 grey levels: yuv420p rounding, 1/25 s frame grid


def test_clip_shorter_than_its_annotation_is_cut_from_its_start(tmp_path):
    path = tmp_path / "short_000000_000010.mp4"
    _ramp_clip(path, 1.0)  # annotated 10 s, really 1 s: the centred seek (4.75 s) is past its end
    cfg = video_cfg(str(tmp_path), str(tmp_path / "out"))
    sample = kinetics.make_sample(Item("short", str(path), 0, (("time_start", 0), ("time_end", 10))), cfg=cfg)
    assert sample["json"]["start_s"] == 0.0
    assert sample["npy"][0, ..., 0].mean() < 3.0
