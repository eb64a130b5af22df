"""Exported models: EMA weights as safetensors plus the resolved config, so a model folder describes itself.

models/stage1/{encoder,decoder,prior}.safetensors + config.yaml ; models/stage2/base.safetensors + config.yaml.
Loading never unpickles: safetensors for weights, YAML for the config. The same files registered in MLflow are a
pyfunc model of class `ulcore.models.pyfunc.SafetensorsBundle` (its own module: it imports MLflow); a registered
version is read back from those files too (`load_registered`), not through the pickled wrapper.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file
import torch
from torch import nn

from ulcore import layout, storage
from ulcore.config import Config, config_from_dict
from ulcore.diffusion.schedule import decoder_schedule, latent_schedule
from ulcore.nets import build_base_model, build_decoder, build_encoder, build_prior


def export_modules(modules: dict[str, nn.Module], cfg: Config, out: str) -> dict[str, str]:
    """Write `<name>.safetensors` for each module and `config.yaml` under `out` (local or s3://).

    Returns local paths of the weight files (for MLflow registration)."""
    local = Path(tempfile.mkdtemp(prefix="ul-export-"))
    files = {}
    for name, module in modules.items():
        path = local / f"{name}.safetensors"
        state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, str(path), metadata={"config_digest": cfg.digest(), "module": name})
        storage.upload_file(str(path), storage.join(out, path.name))
        files[name] = str(path)
    storage.write_text(storage.join(out, "config.yaml"), cfg.to_yaml())
    return files


def _load_config(root: str) -> Config:
    uri = storage.join(root, "config.yaml")
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} not found: no exported model under {root}")
    return config_from_dict(yaml.safe_load(storage.read_text(uri)))


def _load_weights(module: nn.Module, root: str, name: str) -> nn.Module:
    uri = storage.join(root, f"{name}.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / f"{name}.safetensors"
        storage.download_file(uri, str(local))
        module.load_state_dict(load_file(str(local)))
    return module.eval().requires_grad_(False)


@dataclass
class Stage1Bundle:
    """The frozen stage-1 nets (EMA weights, eval mode; loaded on the CPU, `to` moves them) and their config."""

    encoder: nn.Module
    decoder: nn.Module
    prior: nn.Module
    config: Config

    @property
    def latent_schedule(self):
        return latent_schedule(self.config.model)

    @property
    def decoder_schedule(self):
        return decoder_schedule(self.config.model)

    def to(self, device: torch.device | str) -> Stage1Bundle:
        for net in (self.encoder, self.decoder, self.prior):
            net.to(device)
        return self


@dataclass
class Stage2Bundle:
    base: nn.Module
    config: Config

    def to(self, device: torch.device | str) -> Stage2Bundle:
        self.base.to(device)
        return self


def stage1_root(cfg: Config) -> str:
    return layout.model_dir(cfg.storage.root, "stage1")


def stage2_root(cfg: Config) -> str:
    return layout.model_dir(cfg.storage.root, "stage2")


def load_stage1(root: str) -> Stage1Bundle:
    cfg = _load_config(root)
    m = cfg.model
    return Stage1Bundle(encoder=_load_weights(build_encoder(m), root, "encoder"),
                        decoder=_load_weights(build_decoder(m), root, "decoder"),
                        prior=_load_weights(build_prior(m), root, "prior"), config=cfg)


def load_encoder(root: str) -> nn.Module:
    """Only the frozen encoder (the encode pass needs nothing else)."""
    return _load_weights(build_encoder(_load_config(root).model), root, "encoder")


def load_registered(local: Path, what: str) -> tuple[dict[str, torch.Tensor], Config]:
    """The weights and resolved config of a registered version downloaded to `local` (its MLmodel folder; `what`
    names it in errors), from the files its MLmodel lists: the training stages register artefact `weights`, a
    .safetensors file, and `config`, YAML."""
    files = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
    if "weights" not in files or "config" not in files:
        raise FileNotFoundError(f"{what} has artefacts {sorted(files)}, not the weights and config a training stage "
                                "registers")
    state = load_file(str(local / files["weights"]["path"]))
    return state, config_from_dict(yaml.safe_load((local / files["config"]["path"]).read_text()))


def load_stage2(root: str) -> Stage2Bundle:
    cfg = _load_config(root)
    return Stage2Bundle(base=_load_weights(build_base_model(cfg.model), root, "base"), config=cfg)
