"""`unified-latents`: show the resolved params; run one stage without Prefect; promote or roll back the champion by
hand; sample images from the exported models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ulcore import layout
from ulcore.config import add_config_args, config_or_exit


def cmd_config(args: argparse.Namespace) -> int:
    cfg = config_or_exit(args.params, args.overrides)
    sys.stdout.write(cfg.to_yaml())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One stage in this process, as its flow's task runs it (the stage lock held); prints its summary."""
    cfg = config_or_exit(args.params, args.overrides)  # bad params exit before the stages' imports (seconds)
    from ulcore.stages import run_stage

    result = run_stage(args.stage, cfg)
    sys.stdout.write(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1, default=str) + "\n")
    return 0


def cmd_promotion(args: argparse.Namespace) -> int:
    """`promote --run ID` / `rollback`: move the champion alias of all four nets by hand, holding the promote
    stage's lock; recorded as a promotion run in MLflow (ulcore.promotion)."""
    cfg = config_or_exit(args.params, args.overrides)
    from ulcore import promotion
    from ulcore.errors import LineageError
    from ulcore.run_lock import StageLocked, stage_lock

    try:
        with stage_lock(cfg.storage.root, "promote"):
            result = promotion.promote_run(cfg, args.run) if args.command == "promote" else promotion.rollback(cfg)
    except (LineageError, StageLocked) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(result, indent=1, default=str) + "\n")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Base model -> z_0 at λ(0) -> decoder, per-sample seeds: same seed, same images, whatever --batch is."""
    import numpy as np
    import torch

    from ulcore.data.loaders import to_uint8
    from ulcore.diffusion.sampling import generate
    from ulcore.images import image_grid, png_bytes
    from ulcore.models import load_stage1, load_stage2, stage1_root, stage2_root

    cfg = config_or_exit(args.params, args.overrides)
    stage1, stage2 = load_stage1(stage1_root(cfg)), load_stage2(stage2_root(cfg))
    num_classes = stage2.config.model.num_classes
    if args.class_ is not None and not 0 <= args.class_ < num_classes:
        print(f"error: --class {args.class_}: expected 0..{num_classes - 1}", file=sys.stderr)
        return 2
    steps = args.steps or cfg.eval.base_steps
    chunks = []
    for start in range(0, args.n, args.batch):
        idx = list(range(start, min(args.n, start + args.batch)))
        labels = torch.tensor([args.class_ if args.class_ is not None else i % num_classes for i in idx])
        x = generate(stage1, stage2, labels, seed=args.seed, sampler=args.sampler, base_steps=steps,
                     decoder_steps=args.decoder_steps or cfg.eval.decoder_steps,
                     guidance=args.guidance if args.guidance is not None else cfg.eval.guidance,
                     guidance_interval=cfg.eval.guidance_interval, indices=idx)
        chunks.append(to_uint8(x))
    samples = torch.cat(chunks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"samples_seed{args.seed}_n{args.n}" + (f"_class{args.class_}" if args.class_ is not None else "")
    (out / f"{stem}.png").write_bytes(png_bytes(image_grid(samples)))
    np.savez_compressed(out / f"{stem}.npz", samples=samples.numpy(), seed=args.seed)
    print(f"wrote {out / (stem + '.png')} and {out / (stem + '.npz')} ({args.n} samples, "
          f"models from {layout.models(cfg.storage.root)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unified-latents", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the resolved params as YAML")
    add_config_args(p)
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("run", help="run one stage here, without Prefect (as `python -m flows.<stage>` runs it)")
    p.add_argument("stage", choices=list(layout.STAGE_OUTPUTS), help="the stage (dvc.yaml's name)")
    add_config_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("promote", help="make the lineage of a stage-1 or stage-2 MLflow run the champion, by hand")
    p.add_argument("--run", required=True, metavar="ID", help="the MLflow run id of a stage-1 or stage-2 run")
    add_config_args(p)
    p.set_defaults(func=cmd_promotion)
    p = sub.add_parser("rollback", help="move the champion back to the lineage it replaced")
    add_config_args(p)
    p.set_defaults(func=cmd_promotion)
    p = sub.add_parser("sample", help="sample images from the exported stage-1 and stage-2 models")
    add_config_args(p)
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--class", dest="class_", type=int, default=None, help="class label (default: cycle classes)")
    p.add_argument("--steps", type=int, default=0, help="base-model steps (default eval.base_steps)")
    p.add_argument("--decoder-steps", type=int, default=0, help="decoder steps (default eval.decoder_steps)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default eval.guidance)")
    p.add_argument("--sampler", choices=("ddim", "ancestral"), default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="samples per forward (does not change the images)")
    p.add_argument("--out", default="outputs/samples", help="output folder")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "n", 1) < 1 or getattr(args, "batch", 1) < 1:
        print("error: --n and --batch must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
