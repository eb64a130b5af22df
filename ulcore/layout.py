"""Where every stage reads and writes, relative to `storage.root`, and the rule that says an output is done.

    <root>/data/raw/<source>/           generated embedded sources (the shard stage's input when data.root is empty)
    <root>/data/raw_manifest.json       digest of the raw data's listing (ulcore.data.manifest)        (raw_manifest)
    <root>/data/shards/<split>/         <split>-NNNNNN.tar + .stats.json per shard; summary.json,
                                        raw_manifest.json (every raw file the shards were built from)   (shard)
    <root>/data/fid_refs/<key>.npz      FID reference statistics, keyed by what they were computed from (reference)
    <root>/models/stage1/               {encoder,decoder,prior}.safetensors, config.yaml, done.json     (stage1)
    <root>/data/latents/<split>/        latent shards; stats.json                                        (encode)
    <root>/models/stage2/               base.safetensors, config.yaml, done.json                         (stage2)
    <root>/metrics/<stage>.json         final numbers of stage1, stage2 and evaluate ("eval.json")
    <root>/metrics/promotion.json       the promote gate's decision on eval.json's lineage                (promote)
    <root>/outputs/, <root>/plots/      grids, samples and report plots                                   (evaluate)
    <root>/checkpoints/<stage>-<digest>/  Ray Train's resumable training state (not a DVC output)
    <root>/locks/<stage>.lock           one run of a stage per root (ulcore.run_lock)

`STAGE_OUTPUTS` and `STAGE_INPUTS` are the same contract as DVC sees it (dvc.yaml's outs and data deps; a test
checks that they agree).

Done rule: an output is done when its marker — a JSON document written atomically after everything it describes —
records the digest of what it was computed from, and that digest equals the one computed now. Digests are
`digest(doc)`: sha256 of the canonical JSON of a document, 16 hex digits. The markers: a shard's `.stats.json`
(ulcore.data.shards; a latent shard's names its encoder and source shard), a model folder's `done.json`
(`digest`), `metrics/eval.json` (`inputs_digest`), a reference file's embedded key, a checkpoint's `meta.json`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ulcore import storage

RAW_MANIFEST = "data/raw_manifest.json"
SHARDS = "data/shards"
LATENTS = "data/latents"
FID_REFS = "data/fid_refs"
MODELS = "models"
METRICS = "metrics"
OUTPUTS = "outputs"
PLOTS = "plots"
CHECKPOINTS = "checkpoints"
LOCKS = "locks"
DONE_FILE = "done.json"  # a model folder's done marker

# DVC stage -> what it writes / which outputs of other stages it reads, relative to storage.root
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "raw_manifest": (RAW_MANIFEST,),
    "shard": (SHARDS,),
    "reference": (FID_REFS,),
    "stage1": (f"{MODELS}/stage1", f"{METRICS}/stage1.json"),
    "encode": (LATENTS,),
    "stage2": (f"{MODELS}/stage2", f"{METRICS}/stage2.json"),
    "evaluate": (OUTPUTS, f"{METRICS}/eval.json", PLOTS),
    "promote": (f"{METRICS}/promotion.json",),
}
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "raw_manifest": (),
    "shard": (RAW_MANIFEST,),
    "reference": (SHARDS,),
    "stage1": (SHARDS,),
    "encode": (SHARDS, f"{MODELS}/stage1"),
    "stage2": (LATENTS,),
    "evaluate": (SHARDS, FID_REFS, f"{MODELS}/stage1", f"{MODELS}/stage2"),
    "promote": (f"{METRICS}/eval.json",),
}


def raw(root: str, source: str) -> str:
    return storage.join(root, "data", "raw", source)


def raw_manifest(root: str) -> str:
    """The raw data's digest and counts: the shard stage's DVC dependency."""
    return storage.join(root, RAW_MANIFEST)


def shards(root: str, split: str | None = None) -> str:
    """The image (or clip) shards, or one split's folder of them."""
    return storage.join(root, SHARDS, split) if split else storage.join(root, SHARDS)


def shards_summary(root: str) -> str:
    return storage.join(root, SHARDS, "summary.json")


def shards_raw_manifest(root: str) -> str:
    """Every raw file (key, size, ETag or mtime) the current shards were built from."""
    return storage.join(root, SHARDS, "raw_manifest.json")


def latents(root: str, split: str | None = None) -> str:
    return storage.join(root, LATENTS, split) if split else storage.join(root, LATENTS)


def latents_stats(root: str) -> str:
    return storage.join(root, LATENTS, "stats.json")


def fid_ref(root: str, key_hash: str) -> str:
    return storage.join(root, FID_REFS, f"{key_hash}.npz")


def fid_floor(root: str, train_key_hash: str, held_out_key_hash: str) -> str:
    """The cached FID floor of two reference statistics, next to them."""
    return storage.join(root, FID_REFS, f"floor-{train_key_hash}-{held_out_key_hash}.json")


def model_dir(root: str, stage: str) -> str:
    """models/stage1 or models/stage2: the exported EMA nets of a training stage."""
    return storage.join(root, MODELS, stage)


def models(root: str) -> str:
    return storage.join(root, MODELS)


def done_marker(root: str, stage: str) -> str:
    return storage.join(model_dir(root, stage), DONE_FILE)


def metrics(root: str, name: str | None = None) -> str:
    """metrics/<name>.json (stage1, stage2, eval, promotion), or the folder."""
    return storage.join(root, METRICS, f"{name}.json") if name else storage.join(root, METRICS)


def outputs(root: str) -> str:
    return storage.join(root, OUTPUTS)


def plots(root: str) -> str:
    return storage.join(root, PLOTS)


def checkpoints(root: str) -> str:
    return storage.join(root, CHECKPOINTS)


def lock(root: str, stage: str) -> str:
    return storage.join(root, LOCKS, f"{stage}.lock")


def digest(doc: Any) -> str:
    """The digest of a JSON document: sha256 of its canonical form (sorted keys), 16 hex digits."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded_digest(marker_uri: str, key: str = "digest") -> str | None:
    """The digest a done marker records, or None when there is no marker (the output is not done)."""
    if not storage.exists(marker_uri):
        return None
    return storage.read_json(marker_uri).get(key)


def is_done(marker_uri: str, expected: str, key: str = "digest") -> bool:
    """The done rule: the marker exists and records the digest of what the output would be computed from now."""
    return recorded_digest(marker_uri, key) == expected


__all__ = ["STAGE_OUTPUTS", "STAGE_INPUTS", "raw", "raw_manifest", "shards", "shards_summary", "shards_raw_manifest",
           "latents", "latents_stats", "fid_ref", "models", "model_dir", "done_marker", "metrics", "outputs", "plots",
           "checkpoints", "lock", "digest", "recorded_digest", "is_done", "DONE_FILE"]
