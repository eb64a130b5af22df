"""Stage 1 -> encode -> stage 2 -> sample on the embedded data, 2 Ray Train workers, real MLflow (SQLite)."""

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.train.smoke import SMOKE
from ulcore import cli, storage
from ulcore.config import load_config
from ulcore.data import loaders
from ulcore.data.sharding import run_shard
from ulcore.diffusion.sampling import reconstruct
from ulcore.train import stage1 as stage1_module
from ulcore.train.checkpoint import latest_checkpoint, load_state
from ulcore.train.encode import run_encode
from ulcore.models import load_stage1, stage1_root
from ulcore.train.stage1 import Stage1Objective, run_stage1
from ulcore.train.stage2 import run_stage2

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
pytestmark = pytest.mark.slow


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")  # Ray's servers bind IPv4-mapped addresses


@contextlib.contextmanager
def listening_sockets() -> Iterator[set[tuple[str, str]]]:
    """(process name, local address) of every socket listening in this process and its descendants (the local
    Ray instance and its workers), sampled every 0.1 s while the body runs."""
    import psutil

    seen: set[tuple[str, str]] = set()
    stop = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not stop.wait(0.1):
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            seen.add((proc.name(), f"{conn.laddr.ip}:{conn.laddr.port}"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the training stages once for the module; tests read what they wrote."""
    import ray

    root = tmp_path_factory.mktemp("ul")
    cfg = load_config(PARAMS, [*SMOKE, f"storage.root={root}"])
    shard = run_shard(cfg)
    with listening_sockets() as listeners:
        s1 = run_stage1(cfg)
    enc = run_encode(cfg)
    s2 = run_stage2(cfg)
    yield {"cfg": cfg, "root": root, "shard": shard, "stage1": s1, "encode": enc, "stage2": s2,
           "stage1_listeners": listeners}
    ray.shutdown()


def test_a_local_run_listens_on_loopback_only(pipeline):
    listeners = pipeline["stage1_listeners"]
    assert any(name.startswith("ray::RayTrainWo") for name, _ in listeners)  # the sampler saw the workers
    exposed = sorted((name, addr) for name, addr in listeners if addr.rsplit(":", 1)[0] not in LOOPBACK)
    assert exposed == [], f"listening beyond loopback during stage 1: {exposed}"


def test_stage1_writes_models_metrics_and_registers(pipeline):
    root, cfg = pipeline["root"], pipeline["cfg"]
    for name in ("encoder", "decoder", "prior"):
        assert (root / "models" / "stage1" / f"{name}.safetensors").stat().st_size > 0
    metrics = storage.read_json(str(root / "metrics" / "stage1.json"))
    assert metrics["samples"] == 64 and metrics["steps"] == 4
    assert metrics["bits_per_pixel"] > 0 and 0 < metrics["psnr"] < 60
    assert metrics["bits_per_subpixel"] == pytest.approx(metrics["bits_per_pixel"] / 3)
    assert 0 <= metrics["clip_fraction"] <= 1  # share of the run's steps whose gradient was clipped
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.data.tags["stage"] == "stage1" and run.data.params["stage1.loss_factor"] == str(cfg.stage1.loss_factor)
    history = client.get_metric_history(run.info.run_id, "prior_diffusion")
    assert [m.step for m in history] == [16, 32, 48, 64]
    assert {"decoder", "prior_kl_1", "ema_psnr", "final_bits_per_pixel", "final_bits_per_subpixel",
            "bits_per_subpixel", "clip_fraction", "grad_norm"} <= set(run.data.metrics)
    for name in ("encoder", "decoder", "prior"):  # candidates: only the promote stage moves the champion alias
        version = client.get_model_version_by_alias(f"ul-{name}", cfg.tracking.candidate_alias)
        assert version.run_id == run.info.run_id and version.tags["stage1_run_id"] == run.info.run_id
        assert cfg.tracking.champion_alias not in client.get_registered_model(f"ul-{name}").aliases
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reconstructions", "prior_samples"} <= artifacts


def test_export_loads_back_and_reproduces_reconstructions(pipeline):
    cfg = pipeline["cfg"]
    bundle = load_stage1(stage1_root(cfg))
    run_dir = storage.join(cfg.storage.root, "checkpoints")
    folder = latest_checkpoint(storage.list_uris(run_dir, "meta.json")[0].rsplit("/", 2)[0], 
                               storage.read_json(storage.join(stage1_root(cfg), "done.json"))["digest"])
    ema = Stage1Objective(cfg)
    ema.load_state_dict(load_state(Path(folder))["ema"])
    x = loaders.to_float(stage1_module.heldout_batch(cfg, 4))
    a = reconstruct(bundle, x, seed=3, steps=3)
    b = reconstruct(ema.eval(), x, seed=3, steps=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rerun_is_a_no_op(pipeline):
    result = run_stage1(pipeline["cfg"])
    assert result["skipped"] is True


def test_ranks_see_different_samples(pipeline):
    cfg = pipeline["cfg"]
    keys = []
    for rank in (0, 1):
        stream = stage1_module.train_batches(cfg, 8, rank, 2, seed=0)
        keys.append({k for _ in range(3) for k in next(stream)["key"]})
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_encode_writes_one_latent_shard_per_image_shard(pipeline):
    root, cfg = pipeline["root"], pipeline["cfg"]
    for split in cfg.data.splits:
        images = sorted(p.name for p in (root / "data" / "shards" / split).glob("*.tar"))
        latents = sorted(p.name for p in (root / "data" / "latents" / split).glob("*.tar"))
        assert images == latents and images
    stats = storage.read_json(str(root / "data" / "latents" / "stats.json"))
    assert stats["splits"]["train"]["samples"] == 160 and len(stats["train_channels"]["std"]) == 4
    batch = next(iter(loaders.eval_batches(loaders.shard_uris(cfg, "latents", "val"), batch_size=4, kind="latents")))
    assert batch["z"].shape == (4, 4, 8, 8)
    again = run_encode(cfg)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 5


def test_stage2_writes_model_and_base_bitrate(pipeline):
    root = pipeline["root"]
    assert (root / "models" / "stage2" / "base.safetensors").exists()
    metrics = storage.read_json(str(root / "metrics" / "stage2.json"))
    assert metrics["bits_per_pixel_base"] > 0 and metrics["samples"] == 64
    assert metrics["bits_per_subpixel_base"] == pytest.approx(metrics["bits_per_pixel_base"] / 3)
    stage1_run = storage.read_json(str(root / "models" / "stage1" / "done.json"))["mlflow_run_id"]
    assert storage.read_json(str(root / "models" / "stage2" / "done.json"))["stage1_run_id"] == stage1_run
    base = MlflowClient(f"sqlite:///{root}/mlflow.db").get_model_version_by_alias("ul-base", "candidate")
    assert base.run_id == metrics["mlflow_run_id"] and base.tags["stage1_run_id"] == stage1_run  # its lineage


def test_sampling_is_deterministic_per_seed_whatever_the_batch(pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["sample", "--params", str(PARAMS), *[a for o in SMOKE for a in ("--set", o)],
              "--set", f"storage.root={pipeline['root']}", "--n", "4", "--seed", "5", "--steps", "2",
              "--decoder-steps", "2"]
    assert cli.main([*common, "--batch", "4", "--out", "a"]) == 0
    assert cli.main([*common, "--batch", "1", "--out", "b"]) == 0
    a = np.load(tmp_path / "a" / "samples_seed5_n4.npz")["samples"]
    b = np.load(tmp_path / "b" / "samples_seed5_n4.npz")["samples"]
    assert a.shape == (4, 3, 32, 32) and np.array_equal(a, b)
    assert (tmp_path / "a" / "samples_seed5_n4.png").stat().st_size > 0
