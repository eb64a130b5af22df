"""Kill the training process after its first checkpoint, rerun the same command, and it continues from there."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.smoke import SMOKE
from ulcore.config import load_config
from ulcore.data.sharding import run_shard
from ulcore.train.checkpoint import Progress, latest_checkpoint, load_state, save_state
from ulcore.train.ema import EMA

ROOT = Path(__file__).resolve().parents[2]
LONG = ["stage1.total_samples=320", "stage1.ckpt_every_samples=64", "ray.num_workers=1", "ray.num_cpus=2"]
SCRIPT = "import sys; from ulcore.config import load_config; from ulcore.train.stage1 import run_stage1; " \
         "run_stage1(load_config(sys.argv[1], sys.argv[2:]))"


def _train(root: Path, **popen) -> subprocess.Popen:
    overrides = [*SMOKE, *LONG, f"storage.root={root}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(ROOT / "params.yaml"), *overrides], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _kill_with_its_ray(proc: subprocess.Popen) -> None:
    """SIGKILL the training process and wait until every process under it (its local Ray: raylet, workers) is gone:
    a Train worker that outlives its driver by a moment can store one more checkpoint."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for straggler in psutil.wait_procs(tree, timeout=30)[1]:
        straggler.kill()


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    import ray

    cfg = load_config(ROOT / "params.yaml", [*SMOKE, *LONG, f"storage.root={tmp_path}"])
    run_shard(cfg)
    ray.shutdown()  # the training subprocesses start their own local cluster
    first = _train(tmp_path)
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "checkpoints").glob("stage1-*/*/meta.json"))) < 2:
        assert first.poll() is None, f"training ended before its second checkpoint:\n{first.stdout.read()}"
        assert time.monotonic() < deadline, "no second checkpoint within 300 s"
        time.sleep(0.2)
    _kill_with_its_ray(first)
    saved = sorted((int(json.loads(p.read_text())["samples"]), p.parent)
                   for p in (tmp_path / "checkpoints").glob("stage1-*/*/meta.json"))
    (newest, broken), (resumed_from, _) = saved[-1], saved[-2]
    assert 0 < resumed_from < newest < 320
    state = broken / "state.pt"  # the newest checkpoint is cut short: resume takes the one before, naming it
    state.write_bytes(state.read_bytes()[:1000])

    second = _train(tmp_path)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert f"skipping checkpoint {broken}: {state}: sha256" in out
    assert f"resumed at {resumed_from} samples" in out
    steps_done = (320 - resumed_from) // 16
    assert f"finished at 320 samples: {steps_done} steps in this run" in out
    # one line per event, and no tracebacks for what is not an error (another Ray on the machine included)
    status = [line for line in out.splitlines() if "[stage1] [" in line or "[stage1] finished" in line]
    assert len(status) == len(set(status)) == steps_done + 1, "\n".join(status)  # a status line per step
    assert "Traceback" not in out and "Found multiple active Ray instances" not in out, out[-3000:]
    run_dir = next((tmp_path / "checkpoints").glob("stage1-*"))
    final = load_state(Path(latest_checkpoint(str(run_dir), json.loads(
        (tmp_path / "models" / "stage1" / "done.json").read_text())["digest"])))
    assert final["samples"] == 320 and final["step"] == 20
    # AdamW counts its own steps: 20 only if the optimiser state survived the kill
    assert all(int(s["step"]) == 20 for s in final["optimizer"]["state"].values())
    shutil.rmtree(tmp_path / "data")


def test_state_round_trip_restores_model_ema_and_optimiser(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, halflife_samples=8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        ema.update(model, 4)
    save_state(tmp_path, model=model, ema=ema.module, optimizer=opt, scheduler=sched,
               progress=Progress(samples=12, step=3), grad_clip={"running_norm": 2.5, "clipped_steps": 1},
               config_yaml="x: 1\n", digest="d")
    state = load_state(tmp_path)
    model2 = torch.nn.Linear(3, 2)
    model2.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(state["ema"]["weight"], ema.module.weight)
    assert not torch.equal(ema.module.weight, model.weight)  # the EMA lags the model
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert (state["samples"], state["step"]) == (12, 3)
    assert state["grad_clip"] == {"running_norm": 2.5, "clipped_steps": 1}
    assert latest_checkpoint(str(tmp_path.parent), "d") == str(tmp_path)
    assert latest_checkpoint(str(tmp_path.parent), "other") is None


def _tiny_checkpoints(run: Path, samples: list[int]) -> list[Path]:
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    folders = []
    for n in samples:
        save_state(run / f"checkpoint_{n:06d}", model=model, ema=model, optimizer=opt, scheduler=sched,
                   progress=Progress(samples=n, step=n // 16), grad_clip={"running_norm": 0.0, "clipped_steps": 0},
                   config_yaml="x: 1\n", digest="d")
        folders.append(run / f"checkpoint_{n:06d}")
    return folders


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_skips_a_truncated_checkpoint_naming_it_and_loading_one_names_the_file(tmp_path, capsys):
    from ulcore.errors import CorruptCheckpointError

    old, mid, new = _tiny_checkpoints(tmp_path / "run", [16, 32, 48])
    _truncate(new / "state.pt")
    assert latest_checkpoint(str(tmp_path / "run"), "d") == str(mid)
    out = capsys.readouterr().out
    assert f"skipping checkpoint {new}: {new / 'state.pt'}: sha256" in out and "truncated or overwritten" in out
    with pytest.raises(CorruptCheckpointError) as info:  # torch's bare error (PytorchStreamReader...) + the path
        load_state(new)
    assert f"{new / 'state.pt'}: cannot load the training state" in str(info.value)
    # a checkpoint saved before sizes and hashes were recorded is checked by loading it
    meta = json.loads((mid / "meta.json").read_text())
    (mid / "meta.json").write_text(json.dumps({k: meta[k] for k in ("samples", "step", "digest")}))
    _truncate(mid / "state.pt")
    assert latest_checkpoint(str(tmp_path / "run"), "d") == str(old)
    assert f"skipping checkpoint {mid}: {mid / 'state.pt'}: cannot load" in capsys.readouterr().out
    _truncate(old / "state.pt")
    assert latest_checkpoint(str(tmp_path / "run"), "d") is None
    assert "none of its 3 checkpoint(s) is intact (listed above): training starts again from 0 samples" in \
        capsys.readouterr().out


def test_resume_skips_a_truncated_checkpoint_on_s3(tmp_path, s3_bucket, capsys):
    from ulcore import storage

    folders = _tiny_checkpoints(tmp_path / "run", [16, 32])
    _truncate(folders[1] / "state.pt")
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            storage.upload_file(str(path), f"{s3_bucket}/run/{path.relative_to(tmp_path / 'run')}")
    assert latest_checkpoint(f"{s3_bucket}/run", "d") == f"{s3_bucket}/run/checkpoint_000016"
    assert f"skipping checkpoint {s3_bucket}/run/checkpoint_000032" in capsys.readouterr().out


def test_ema_starts_equal_and_follows_the_halflife():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))  # several tensors, and buffers
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    ema = EMA(model, halflife_samples=10)
    assert all(torch.equal(e, p) for e, p in zip(ema.module.parameters(), model.parameters()))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model, batch_samples=10)  # one half-life: every parameter halfway to the model
    for e in ema.module.parameters():
        assert torch.allclose(e, torch.full_like(e, 0.5))
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # buffers are copied
    ema.update(model, batch_samples=20)  # two half-lives: a quarter of the rest of the way left
    assert all(torch.allclose(e, torch.full_like(e, 0.875)) for e in ema.module.parameters())


def test_warmup_is_linear_in_samples_and_the_scheduler_follows_it():
    from ulcore.config import load_config as load
    from ulcore.train.loop import lr_at

    t = load(None, ["stage1.batch_size=16", "stage1.warmup_samples=64"]).stage1
    assert [lr_at(16 * k, t) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    opt = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step * t.batch_size, t))
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([t.lr * f for f in (0.25, 0.5, 0.75, 1.0, 1.0)])


def test_cooldown_is_linear_to_zero_over_the_last_fraction_after_the_warmup():
    from ulcore.config import ConfigError
    from ulcore.config import load_config as load
    from ulcore.train.loop import lr_at

    short = ["stage1.batch_size=16", "stage1.warmup_samples=32", "stage1.total_samples=160"]
    t = load(None, [*short, "stage1.decay_fraction=0.5"]).stage1  # half of the 128 samples after the warm-up
    assert [lr_at(16 * k, t) for k in range(10)] == [0.5] + [1.0] * 6 + [0.75, 0.5, 0.25]
    flat = load(None, [*short, "stage1.decay_fraction=0"]).stage1
    assert [lr_at(16 * k, flat) for k in range(10)] == [0.5] + [1.0] * 9
    whole = load(None, [*short, "stage1.decay_fraction=1"]).stage1  # from the warm-up's end on
    assert [lr_at(16 * k, whole) for k in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    for bad in ("1.5", "-0.1"):
        with pytest.raises(ConfigError, match=rf"stage1.decay_fraction = {bad}: must lie in \[0, 1\]"):
            load(None, [*short, f"stage1.decay_fraction={bad}"])


def test_activation_checkpointing_does_not_change_the_run_identity():
    from ulcore.train.loop import run_digest
    from ulcore.train.stage1 import SPEC

    plain = load_config(None, [])
    assert run_digest(plain, SPEC, "data") == run_digest(
        load_config(None, ["stage1.activation_checkpointing=true"]), SPEC, "data")
    assert run_digest(plain, SPEC, "data") != run_digest(load_config(None, ["stage1.lr=0.01"]), SPEC, "data")


def test_final_numbers_reuse_the_last_reports_monitor_and_compute_them_when_the_fit_reported_none(tmp_path):
    import dataclasses

    from ulcore.train.loop import FitResult, final_monitor
    from ulcore.train.stage1 import SPEC, Stage1Objective

    cfg = load_config(None, [*SMOKE, f"storage.root={tmp_path}"])
    calls = []
    spec = dataclasses.replace(SPEC, monitor=lambda *args: calls.append(args[2]) or {"ema_psnr": 1.0})
    ema = Stage1Objective(cfg)
    last = {"loss": 3.0, "samples": 64, "ema_psnr": 17.5, "ema_bits_per_pixel": 0.2}
    assert final_monitor(cfg, spec, ema, FitResult(tmp_path, last), 64, None) == {"ema_psnr": 17.5,
                                                                                   "ema_bits_per_pixel": 0.2}
    assert calls == []
    assert final_monitor(cfg, spec, ema, FitResult(tmp_path, {}), 64, None) == {"ema_psnr": 1.0}  # already complete
    assert final_monitor(cfg, spec, ema, FitResult(tmp_path, {**last, "samples": 32}), 64, None) == {"ema_psnr": 1.0}
    assert calls == [64, 64]
