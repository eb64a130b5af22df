"""The Prefect <-> DVC contract (docs/design.md §4): after the `ul` flow finishes, `dvc status` is clean.

A stage run through Prefect executes the same code `dvc repro` would; afterwards the flow records what it
produced with `dvc commit -f <stage>` (hashes deps, params and outs into dvc.lock and the DVC cache) and, at the
end, `dvc push`es when a remote is configured. Recording is honest only when DVC would have run the same thing,
so it happens only when:
- the working directory is inside a DVC repository whose dvc.yaml defines the stage,
- the run's resolved config equals the one DVC sees (`params.yaml` with no overrides, by digest),
- `storage.root` is that repository's root (DVC outs are the repo-relative data/, models/, metrics/ ...),
- and we are not ourselves a command run by `dvc repro` (DVC records those; it also holds the repo lock).
Otherwise recording is skipped with a message saying why.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ulcore.config import Config, ConfigError, load_config


def dvc_root(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def recording_blocker(cfg: Config, stages: list[str]) -> tuple[Path | None, str]:
    """(DVC root, "") when versions can be recorded for `stages`, else (None, the reason)."""
    if os.environ.get("DVC_STAGE"):
        return None, "running under `dvc repro`, which records versions itself"
    root = dvc_root()
    if root is None:
        return None, "not inside a DVC repository (run `dvc init` at the repo root to version the outputs)"
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return None, f"no dvc.yaml in {root}"
    defined = set((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}))
    missing = [s for s in stages if s not in defined]
    if missing:
        return None, f"dvc.yaml does not define {', '.join(missing)}"
    if cfg.storage.root.startswith("s3://") or Path(cfg.storage.root).resolve() != root:
        return None, f"storage.root {cfg.storage.root!r} is not the DVC repository root {root}"
    try:
        seen_by_dvc = load_config(root / "params.yaml", [])
    except ConfigError as exc:
        return None, f"params.yaml as DVC sees it is invalid ({exc})"
    if seen_by_dvc.digest() != cfg.digest():
        return None, ("this run's params differ from params.yaml (overrides or another params file); put them in "
                      "params.yaml or use `dvc exp run -S section.key=value` to version such a run")
    return root, ""


def _repo(root: Path):
    """DVC's Python API in this process: a `dvc` subprocess costs ~1.3 s of start-up per call, this ~0.2 s."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    return Repo(str(root))


def stage_up_to_date(root: Path, stage: str) -> bool:
    """`dvc status <stage>` reports nothing: deps, params and outs match dvc.lock."""
    with _repo(root) as repo:
        return not repo.status(targets=[stage])


def commit_stage(root: Path, stage: str) -> None:
    """`dvc commit --force <stage>`: hash deps, params and outs into dvc.lock and the DVC cache."""
    try:
        with _repo(root) as repo:
            repo.commit(stage, force=True)
    except Exception as exc:  # DVC raises its own DvcException subclasses; name the stage and keep the cause
        raise RuntimeError(f"dvc commit {stage} failed: {type(exc).__name__}: {exc}") from exc


def has_remote(root: Path) -> bool:
    with _repo(root) as repo:
        return bool(repo.config.get("remote"))


def push(root: Path) -> str:
    """`dvc push`: every cached version to the default remote; returns what was done."""
    try:
        with _repo(root) as repo:
            pushed = repo.push()
    except Exception as exc:
        raise RuntimeError(f"dvc push failed: {type(exc).__name__}: {exc}") from exc
    return f"{pushed} file(s) pushed" if pushed else "everything up to date on the remote"
