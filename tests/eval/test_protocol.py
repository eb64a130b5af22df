"""The evaluation protocol: one object owns every seed and count, and the phases' noise streams never overlap."""

from __future__ import annotations

import dataclasses

from ulcore.config import load_config
from ulcore.eval.protocol import MONITORING_BELOW, EvalProtocol


def _protocol(*overrides: str) -> EvalProtocol:
    cfg = load_config(None, list(overrides))
    return EvalProtocol.from_config(cfg, train_split="train", eval_split="val", gfid_reference_key="a" * 16,
                                    rfid_reference_key="b" * 16, floor_reference_key="d" * 16,
                                    fid_network={"fid_weights_sha256": "c" * 64})


def test_each_phase_has_its_own_noise_streams():
    p = _protocol("eval.seed=7", "eval.num_samples=12", "eval.sampler=ancestral", "eval.base_steps=5")
    assert (p.num_samples, p.sampler, p.base_steps, p.seed) == (12, "ancestral", 5, 7)
    # generate() takes streams base .. base + 1 (base + 3 with context frames), reconstruct() base .. base + 1
    generation = {p.generation_seed, p.generation_seed + 1}
    reconstruction = {p.reconstruction_seed, p.reconstruction_seed + 1}
    prediction = set(range(p.prediction_seed, p.prediction_seed + 4))
    assert generation == {7, 8} and not generation & reconstruction and not (generation | reconstruction) & prediction
    assert p.bits_seed not in generation | reconstruction | prediction


def test_describe_is_the_protocol_eval_json_records():
    p = _protocol("eval.seed=3", "eval.num_samples=4")
    d = p.describe(load_config(None, []), num_reconstructed=4, gfid_reference={"key_hash": p.gfid_reference_key},
                   rfid_reference={"key_hash": p.rfid_reference_key})
    assert d["seeds"] == {"generate": "sample_seeds(3, 0..3) and 4", "reconstruct": 5, "bits": "7 + batch start",
                          "prior": "sample_seeds(12, 0..3) and 13"}
    assert d["gfid_reference"]["key_hash"] == "a" * 16 and d["fid_weights_sha256"] == "c" * 64
    assert d["monitoring"] is True and str(MONITORING_BELOW) in d["monitoring_note"]
    assert _protocol(f"eval.num_samples={MONITORING_BELOW}").monitoring is False


def test_digest_changes_with_what_the_numbers_depend_on_only():
    """The promote gate compares numbers under one digest: N, seeds and the reference statistics count; batch and
    grid sizes (per-sample seeds) and where the FID network file lies do not."""
    base = _protocol("eval.num_samples=4")
    assert _protocol("eval.num_samples=4", "eval.batch_size=7", "eval.grid_size=9").digest() == base.digest()
    moved = EvalProtocol.from_config(load_config(None, ["eval.num_samples=4"]), train_split="train", eval_split="val",
                                     gfid_reference_key="a" * 16, rfid_reference_key="b" * 16,
                                     floor_reference_key="d" * 16,
                                     fid_network={"fid_weights_sha256": "c" * 64, "fid_weights_path": "/elsewhere"})
    assert moved.digest() == base.digest()
    # the prior's seed moves only gfid_prior, which no gate compares: evaluations from before it still compare
    assert dataclasses.replace(base, prior_seed=99).digest() == base.digest()
    assert _protocol("eval.num_samples=5").digest() != base.digest()
    assert _protocol("eval.num_samples=4", "eval.seed=9").digest() != base.digest()
    other_data = EvalProtocol.from_config(load_config(None, ["eval.num_samples=4"]), train_split="train",
                                          eval_split="val", gfid_reference_key="e" * 16, rfid_reference_key="b" * 16,
                                          floor_reference_key="d" * 16, fid_network={"fid_weights_sha256": "c" * 64})
    assert other_data.digest() != base.digest()
