"""Loaders on shards written by write_shard: disjoint ranks, exact eval pass, flips, latents, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ulcore.data import loaders
from ulcore.data.shards import shard_name, write_shard

N_SHARDS, PER_SHARD, RES = 4, 6, 8


def _image(i: int) -> bytes:
    import io

    from PIL import Image

    arr = np.zeros((RES, RES, 3), np.uint8)
    arr[:, : RES // 2] = 200  # left half bright: a flip is visible
    arr[0, 0] = i % 256
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("img-shards")
    uris = []
    for s in range(N_SHARDS):
        uri = str(root / shard_name("train", s))
        samples = [{"__key__": f"k{s}_{j}", "png": _image(s * PER_SHARD + j), "cls": j % 3, "json": {"i": j}}
                   for j in range(PER_SHARD)]
        stats = write_shard(uri, samples, {"split": "train"})
        assert stats["samples"] == PER_SHARD and stats["classes"] == {"0": 2, "1": 2, "2": 2}
        uris.append(uri)
    return uris


def test_eval_pass_is_exact_and_ordered(image_shards):
    batches = list(loaders.eval_batches(image_shards, batch_size=5, kind="images"))
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"k{s}_{j}" for s in range(N_SHARDS) for j in range(PER_SHARD)]
    assert [len(b["key"]) for b in batches] == [5, 5, 5, 5, 4]
    assert batches[0]["x"].dtype == torch.uint8 and batches[0]["x"].shape == (5, 3, RES, RES)
    assert batches[0]["cls"].dtype == torch.int64
    assert keys == [k for b in loaders.eval_batches(image_shards, batch_size=5, kind="images") for k in b["key"]]


def test_two_ranks_are_disjoint(image_shards):
    seen = []
    for rank in range(2):
        it = loaders.train_batches(image_shards, batch_size=4, rank=rank, world_size=2, seed=0, kind="images",
                                   flip=False, num_workers=1)
        seen.append({k for b in itertools.islice(it, 6) for k in b["key"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] <= {f"k{s}_{j}" for s in range(N_SHARDS) for j in range(PER_SHARD)}
    eval_keys = [{k for b in loaders.eval_batches(image_shards, batch_size=50, rank=r, world_size=2, kind="images")
                  for k in b["key"]} for r in range(2)]
    assert not eval_keys[0] & eval_keys[1] and len(eval_keys[0] | eval_keys[1]) == N_SHARDS * PER_SHARD


def test_flip_mirrors_some_images(image_shards):
    it = loaders.train_batches(image_shards, batch_size=8, rank=0, world_size=1, seed=3, kind="images", flip=True,
                               num_workers=0)
    x = torch.cat([next(it)["x"] for _ in range(4)])
    left_bright = x[:, 0, 4, 1] == 200
    assert left_bright.any() and (~left_bright).any()  # both orientations present
    assert torch.all(x[~left_bright][:, 0, 4, -2] == 200)  # the mirrored ones are exact mirrors


def test_too_few_shards_is_a_clear_error(image_shards):
    with pytest.raises(ValueError, match=r"4 shards for 2 rank\(s\) x 3 loader worker\(s\)"):
        next(loaders.train_batches(image_shards, batch_size=2, rank=0, world_size=2, seed=0, kind="images",
                                   flip=False, num_workers=3))


def test_latent_shards(tmp_path):
    z = np.random.default_rng(0).standard_normal((3, 4, 2, 2)).astype(np.float16)
    uri = str(tmp_path / shard_name("train", 0))
    write_shard(uri, [{"__key__": f"z{i}", "npy": z[i], "cls": i} for i in range(3)])
    batch = next(loaders.eval_batches([uri], batch_size=3, kind="latents"))
    assert batch["z"].dtype == torch.float32 and torch.equal(batch["z"], torch.from_numpy(z.astype(np.float32)))
    assert batch["cls"].tolist() == [0, 1, 2]


def test_float_conversion_round_trips():
    x = torch.arange(256, dtype=torch.uint8)
    f = loaders.to_float(x)
    assert f.min() == -1.0 and f.max() == 1.0
    assert torch.equal(loaders.to_uint8(f), x)
    assert torch.equal(loaders.to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_write_shard_rejects_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="no dots"):
        write_shard(str(tmp_path / "train-000000.tar"), [{"__key__": "a.b", "cls": 1}])
    assert not (tmp_path / "train-000000.tar").exists() and not list(tmp_path.glob("*.stats.json"))


@pytest.fixture
def one_garbage_shard(image_shards, tmp_path):
    """A copy of the shards with the second tar replaced by random bytes (its stats still count its samples)."""
    import shutil

    uris = []
    for uri in image_shards:
        for src in (uri, uri[: -len(".tar")] + ".stats.json"):
            shutil.copy(src, tmp_path)
        uris.append(str(tmp_path / uri.rsplit("/", 1)[-1]))
    (tmp_path / shard_name("train", 1)).write_bytes(np.random.default_rng(0).bytes(20_000))
    return uris


def test_an_unreadable_shard_stops_a_reader_naming_it(one_garbage_shard):
    from ulcore.errors import CorruptDataError

    bad = one_garbage_shard[1]
    with pytest.raises(CorruptDataError, match=rf"{bad}: unreadable shard \(ReadError: invalid header\); 1 "
                                               r"unreadable shard\(s\) > data.max_bad_shards = 0"):
        list(loaders.eval_batches(one_garbage_shard, batch_size=5, kind="images"))
    with pytest.raises(CorruptDataError, match=bad):
        list(itertools.islice(loaders.train_batches(one_garbage_shard, batch_size=4, rank=0, world_size=1, seed=0,
                                                    kind="images", flip=False, num_workers=0), 20))


def test_skipped_shards_and_samples_are_counted_in_every_batch(one_garbage_shard, tmp_path, caplog):
    from ulcore.errors import CorruptDataError

    it = loaders.train_batches(one_garbage_shard, batch_size=4, rank=0, world_size=1, seed=0, kind="images",
                               flip=False, num_workers=0, max_bad_shards=1)
    batches = list(itertools.islice(it, 20))
    assert batches[-1]["bad_shards"] == 1 and batches[-1]["bad_samples"] == 0  # drawn again and again, counted once
    assert not {k for b in batches for k in b["key"]} & {f"k1_{j}" for j in range(PER_SHARD)}
    assert f"skipping unreadable shard {one_garbage_shard[1]}" in caplog.text
    uri = str(tmp_path / shard_name("train", 7))  # a readable tar with one sample that is not an image
    write_shard(uri, [{"__key__": "broken", "png": b"not a png", "cls": 0},
                      {"__key__": "fine", "png": _image(0), "cls": 0}])
    with pytest.raises(CorruptDataError, match=rf"{uri}:broken: unreadable sample \(cannot decode sample"):
        list(loaders.eval_batches([uri], batch_size=2, kind="images"))
    it = loaders.train_batches([uri], batch_size=2, rank=0, world_size=1, seed=0, kind="images", flip=False,
                               num_workers=0, max_bad_samples=1)
    assert next(it)["bad_samples"] == 1
