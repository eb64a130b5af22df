"""The encode task on one hand-made image shard, in process: float16 latents equal to the encoder's output, channel
sums that match them, and a rerun that keeps the finished shard; the prefetching iterator a GPU task reads through."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ulcore.config import load_config
from ulcore.data import loaders
from ulcore.data.shards import read_stats, write_shard
from ulcore.nets import build_encoder
from ulcore.train.encode import encode_shard, prefetched
from ulcore.models import export_modules, stage1_root

OVERRIDES = ["model.encoder_channels=[8,16]", "encode.batch_size=3"]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_prefetched_yields_every_item_in_order_from_another_thread():
    producers = []

    def items():
        for i in range(5):
            producers.append(threading.get_ident())
            yield {"i": i}

    assert [item["i"] for item in prefetched(items())] == list(range(5))
    assert set(producers) == {producers[0]} and producers[0] != threading.get_ident()


def test_prefetched_raises_the_producers_error_at_the_consumer():
    def items():
        yield 1
        raise OSError("truncated tar")

    with pytest.raises(OSError, match="truncated tar"):
        list(prefetched(items()))


def test_encode_shard_writes_the_encoders_latents_and_their_channel_sums(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}", *OVERRIDES])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model).eval()
    export_modules({"encoder": encoder}, cfg, stage1_root(cfg))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    source = str(tmp_path / "shards" / "train-000000.tar")
    write_shard(source, ({"__key__": f"img{i}", "png": png(x), "cls": i % 2} for i, x in enumerate(images)))
    out = str(tmp_path / "latents" / "train-000000.tar")

    stats = encode_shard(source, out, cfg.to_dict(), {}, "enc-1")

    with torch.inference_mode():
        expected = encoder(loaders.to_float(torch.from_numpy(images).permute(0, 3, 1, 2)))
    written = next(iter(loaders.eval_batches([out], batch_size=5, kind="latents")))
    assert written["key"] == [f"img{i}" for i in range(5)] and written["cls"].tolist() == [0, 1, 0, 1, 0]
    torch.testing.assert_close(written["z"], expected.half().float())
    sums = stats["channel_stats"]
    assert sums["count"] == 5 * expected.shape[2] * expected.shape[3]
    np.testing.assert_allclose(sums["sum"], expected.double().sum((0, 2, 3)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(sums["sumsq"], (expected.double() ** 2).sum((0, 2, 3)).numpy(), rtol=1e-5)
    assert read_stats(out)["encoder"] == "enc-1"

    assert encode_shard(source, out, cfg.to_dict(), {}, "enc-1")["skipped"]
    assert "skipped" not in encode_shard(source, out, cfg.to_dict(), {}, "enc-2")


def test_run_encode_removes_the_latent_shard_of_a_removed_image_shard(tmp_path):
    """Resharding removed an image shard (its raw inputs vanished): its latent shard goes too, the rest is kept."""
    import ray

    from ulcore import layout, storage
    from ulcore.data.shards import list_shards, stats_uri
    from ulcore.train.encode import run_encode

    cfg = load_config(None, [f"storage.root={tmp_path}", "data.splits=[train]", "ray.num_cpus=1", *OVERRIDES])
    export_modules({"encoder": build_encoder(cfg.model).eval()}, cfg, stage1_root(cfg))
    storage.write_json(layout.done_marker(str(tmp_path), "stage1"), {"digest": "enc-1"})
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    shards = [storage.join(layout.shards(str(tmp_path), "train"), f"train-00000{i}.tar") for i in range(2)]
    for i, uri in enumerate(shards):
        write_shard(uri, ({"__key__": f"img{i}{j}", "png": png(x), "cls": 0} for j, x in enumerate(images)))
    latents = layout.latents(str(tmp_path), "train")
    try:
        assert run_encode(cfg)["shards_written"] == 2 and len(list_shards(latents, "train")) == 2
        storage.remove(stats_uri(shards[0]))
        storage.remove(shards[0])
        result = run_encode(cfg)
    finally:
        ray.shutdown()  # its one-CPU local instance is not what later tests ask for
    assert result["shards_skipped"] == 1 and result["stats"]["splits"]["train"] == {"shards": 1, "samples": 4}
    assert [u.rsplit("/", 1)[-1] for u in storage.list_uris(latents)] == ["train-000001.stats.json",
                                                                           "train-000001.tar"]
