"""Typed params: resolution order, presets, and one clear message per kind of invalid value."""

import subprocess
import sys

import pytest
import yaml

from ulcore.config import PRESETS, ConfigError, check_model_matches_data, config_from_dict, load_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_project_params_file_resolves_to_the_tiny_preset():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.preset == "tiny" and cfg.model.logsnr_0 == 5.0 and cfg.data.source == "embedded"
    assert cfg.data.resolution % cfg.model.downsample == 0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(preset, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"preset": preset, "data": {"root": "/raw"}}))
    cfg = load_config(path)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_resolution_order_file_then_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"preset": "imagenet512", "data": {"root": "s3://b/imagenet"},
                                    "stage1": {"loss_factor": 1.7}}))
    cfg = load_config(path, ["stage1.loss_factor=2.1", "model.logsnr_0=4"])
    assert cfg.stage1.loss_factor == 2.1 and cfg.model.logsnr_0 == 4.0
    assert cfg.model.latent_channels == 32 and cfg.data.resolution == 512  # from the preset
    assert cfg.stage1.decoder_bias == -3.0


@pytest.mark.parametrize("override,fragment", [
    (["model.logsnr_0=99"], "model.logsnr_0 = 99.0: must lie inside the latent schedule's range"),
    (["model.logsnr_0=-20"], "model.logsnr_0 = -20.0"),
    (["stage1.loss_factor=0"], "stage1.loss_factor = 0.0: must be > 0"),
    (["stage1.loss_factor=abc"], "stage1.loss_factor = 'abc': expected a number"),
    (["stage2.eval_batch=0"], "stage2.eval_batch = 0: must be >= 1"),
    (["stage2.eval_steps=0"], "stage2.eval_steps = 0: must be >= 1"),
    (["model.norm_groups=0"], "model.norm_groups = 0: must be >= 1"),
    (["data.resolution=34"], "data.resolution = 34: must be divisible by the encoder's downsampling factor 4"),
    (["preset=tiny-video", "model.temporal_kernel=2"], "model.temporal_kernel = 2: must be an odd number >= 1"),
    (["stage1.nope=1"], "stage1.nope: unknown key"),
    (["nosection.key=1"], "unknown section 'nosection'"),
    (["data.source=cifar"], "data.source = 'cifar': must be one of"),
    (["stage1.log_every_samples=100"], "stage1.log_every_samples = 100: must be a non-negative multiple of"),
    (["ray.num_workers=3"], "stage1.batch_size = 16: must be divisible by ray.num_workers = 3"),
    (["model.encoder_channels=5"], "model.encoder_channels = 5: expected a list of int"),
    (["data.random_flip=1"], "data.random_flip = 1: expected true or false"),
    (["loss_factor"], "expected section.key=value"),
    (["promote.metric=loss"], "promote.metric = 'loss': must be one of gfid, rfid, fvd, psnr, ssim"),
    (["promote.min_improvement=1.5"], "promote.min_improvement = 1.5: must lie in [0, 1)"),
    (["promote.guards={psnr: -1}"], "promote.guards.psnr = -1.0: must be >= 0"),
    (["promote.guards={sharpness: 1}"], "promote.guards.sharpness = 1.0: guard a metric among gfid"),
    (["promote.guards={psnr: lots}"], "promote.guards.psnr = 'lots': expected a number"),
    (["promote.guards=[psnr]"], "promote.guards = ['psnr']: expected a mapping of strings to numbers"),
    (["tracking.candidate_alias=champion"], "tracking.candidate_alias = 'champion': must differ from"),
    (["tracking.champion_alias=latest"], "tracking.champion_alias = 'latest': must be a non-empty alias other"),
])
def test_invalid_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "params.yaml", override)
    assert fragment in str(info.value)


@pytest.mark.parametrize("written,value", [
    ("2e-4", 2e-4), ("1E-3", 1e-3), ("3.0e+2", 300.0), (".5", 0.5), ("1_000", 1000.0), ("2e-3", 2e-3),
    ("1e4", 1e4), ("1.0e4", 1e4), ("+5e-1", 0.5), ("7", 7.0),
])
def test_every_spelling_of_a_number_is_a_number_in_set_and_in_params_files(written, value, tmp_path):
    # YAML 1.1 reads 2e-4, 1E-3 and 1.0e4 as strings: they must still fill a float field
    assert load_config(None, [f"stage2.weight_decay={written}"]).stage2.weight_decay == value
    path = tmp_path / "p.yaml"
    path.write_text(f"stage1:\n  lr: {written}\nmodel:\n  logsnr_min: -{written.lstrip('+')}\n")
    cfg = load_config(path) if value < 20 else load_config(path, ["model.logsnr_min=-1.5E+1"])
    assert cfg.stage1.lr == value and cfg.model.logsnr_min == (-value if value < 20 else -15.0)


@pytest.mark.parametrize("written,value", [("1e4", 10_000), ("1_024", 1024), ("2.048e+3", 2048), ("64", 64)])
def test_integer_fields_take_every_spelling_of_a_whole_number(written, value, tmp_path):
    assert load_config(None, [f"stage1.seed={written}"]).stage1.seed == value
    path = tmp_path / "p.yaml"
    path.write_text(f"stage1:\n  seed: {written}\n")
    seed = load_config(path).stage1.seed
    assert seed == value and type(seed) is int


@pytest.mark.parametrize("override,fragment", [
    ("stage1.seed=1.5e0", "stage1.seed = '1.5e0': expected an integer"),
    ("stage1.seed=64.5", "stage1.seed = 64.5: expected an integer"),
    ("stage1.lr=1e", "stage1.lr = '1e': expected a number"),
    ("stage1.lr=nan", "stage1.lr = 'nan': expected a number"),
    ("stage1.lr=.inf", "stage1.lr = inf: expected a number"),
    ("stage1.betas=[0.9, 9.9e-1x]", "stage1.betas[1] = '9.9e-1x': expected a number"),
])
def test_text_that_is_not_a_number_is_refused_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_video_source_with_image_nets_is_fine_to_shard_but_not_to_train():
    cfg = load_config(ROOT / "params.yaml", ["data.source=embedded-video"])
    with pytest.raises(ConfigError, match=r"model.frames = 1: data.source = 'embedded-video' needs model.frames > 1"):
        check_model_matches_data(cfg)
    check_model_matches_data(load_config(ROOT / "params.yaml"))


def test_unknown_key_in_params_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model:\n  logsnr0: 5\n")
    with pytest.raises(ConfigError, match=r"model.logsnr0: unknown key; allowed keys in \[model\]: logsnr_0"):
        load_config(path)


def test_configs_saved_by_earlier_versions_load():
    """A key an earlier version wrote (models' config.yaml, checkpoints) is accepted and has no effect."""
    saved = load_config(ROOT / "params.yaml").to_dict()
    saved["encode"]["samples_per_shard"] = 0
    saved["tracking"]["alias"] = "champion"  # training set it; now only promotion moves the champion alias
    assert config_from_dict(saved) == load_config(ROOT / "params.yaml")


def test_a_saved_config_without_a_later_key_rebuilds_the_nets_it_trained():
    """model.norm_groups came with default 8; nets saved before it had 32 groups and must load as they were."""
    saved = load_config(ROOT / "params.yaml").to_dict()
    assert saved["model"]["norm_groups"] == 8 and config_from_dict(saved).model.norm_groups == 8
    del saved["model"]["norm_groups"]
    assert config_from_dict(saved).model.norm_groups == 32


@pytest.mark.parametrize("argv", [
    ["-m", "ulcore.cli", "config", "--set", "model.logsnr_0=99"],
    ["-m", "ulcore.cli", "sample", "--set", "stage1.loss_factor=-1"],
    ["-m", "ulcore.cli", "run", "stage1", "--set", "stage1.loss_factor=-1"],
])
def test_entry_points_fail_fast_with_the_key_named(argv, tmp_path):
    proc = subprocess.run([sys.executable, *argv, "--params", str(ROOT / "params.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "error: invalid params:" in proc.stderr and ("model.logsnr_0" in proc.stderr or "loss_factor" in proc.stderr)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_config_command_prints_resolved_yaml(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ulcore.cli", "config", "--params", str(ROOT / "params.yaml"),
                           "--set", "stage1.loss_factor=1.7"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["stage1"]["loss_factor"] == 1.7 and resolved["model"]["logsnr_0"] == 5.0


def _shipped_params_with(tmp_path, old: str, new: str):
    text = (ROOT / "params.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def test_editing_only_preset_in_the_shipped_params_switches_to_video(tmp_path):
    path = _shipped_params_with(tmp_path, "preset: tiny\n", "preset: tiny-video\n")
    cfg = load_config(path)
    assert cfg == load_config(None, ["preset=tiny-video"])
    assert cfg.data.source == "embedded-video" and cfg.model.frames == cfg.video.frames == 8
    check_model_matches_data(cfg)


def test_shipped_params_pin_no_value_a_preset_sets():
    """The rule that makes `preset:` alone switch presets: preset-dependent keys are written as null."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    pinned = {f"{s}.{k}" for s, values in shipped.items() if isinstance(values, dict)
              for k, v in values.items() if v is not None}
    by_presets = {f"{s}.{k}" for preset in PRESETS.values() for s, values in preset.items() for k in values}
    assert pinned and not pinned & by_presets


def test_null_keeps_the_preset_value_and_a_written_value_overrides_it(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"preset": "imagenet512", "data": {"root": "/raw", "resolution": None},
                                    "stage1": {"loss_factor": None, "decoder_bias": 0.5}}))
    cfg = load_config(path)
    assert cfg.stage1.loss_factor == 1.5 and cfg.data.resolution == 512  # the preset's
    assert cfg.stage1.decoder_bias == 0.5  # written
    path.write_text("stage1:\n  nope: null\n")
    with pytest.raises(ConfigError, match=r"stage1.nope: unknown key"):
        load_config(path)


def test_set_preset_overrides_the_file_and_the_last_one_wins():
    cfg = load_config(ROOT / "params.yaml", ["preset=imagenet512", "preset=tiny-video", "stage1.total_samples=1024"])
    assert cfg.preset == "tiny-video" and cfg.model.frames == 8 and cfg.stage1.total_samples == 1024
    with pytest.raises(ConfigError, match=r"--set 'preset=cifar': preset = 'cifar': unknown preset; allowed: tiny"):
        load_config(ROOT / "params.yaml", ["preset=cifar"])


def test_config_command_takes_preset_and_shows_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ulcore.cli", "config", "--params", str(ROOT / "params.yaml"),
                           "--preset", "tiny-video"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["preset"] == "tiny-video" and resolved["data"]["source"] == "embedded-video"
    assert resolved["model"]["frames"] == 8


def test_flow_entry_point_refuses_an_unknown_preset(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.stage1", "--params", str(ROOT / "params.yaml"),
                           "--preset", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "preset = 'nope': unknown preset; allowed: tiny, tiny-video, imagenet512, kinetics600" in proc.stderr


def test_grad_clip_mode_is_checked():
    with pytest.raises(ConfigError, match=r"stage1.grad_clip_mode = 'median': must be one of absolute, relative"):
        load_config(ROOT / "params.yaml", ["stage1.grad_clip_mode=median"])
