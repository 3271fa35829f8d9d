"""`replaykd evaluate`: top-1/5 of an exported student on a split, loaded through timm as a timm user would."""
from __future__ import annotations

import json

import typer
from torch.utils.data import DataLoader

from replaykd.device import pick_device
from replaykd.engine import evaluate
from replaykd.errors import ReplayKDError
from replaykd.export import eval_transform, load_exported
from replaykd.loader import EvalViews, loader_settings
from replaykd.manifest import Manifest
from replaykd.student import Student
from replaykd.stages.options import EvaluateOptions


def main(o: EvaluateOptions) -> None:
    """Load the exported model, evaluate each of its heads, print the figures."""
    dev = pick_device(o.device)
    manifest = Manifest.load(o.manifest)
    split = manifest.eval_split(o.split, "--split")
    if split is None:
        raise ReplayKDError("--split none: nothing to evaluate")
    model, info = load_exported(o.checkpoint, dev)
    if info["num_classes"] != manifest.num_classes or info.get("classes", manifest.classes) != manifest.classes:
        raise ReplayKDError(f"{o.checkpoint} was trained on {info['num_classes']} classes "
                            f"({info.get('classes', [])[:3]}...), the manifest has {manifest.num_classes} "
                            f"({manifest.classes[:3]}...)")
    student = Student(model, info["model"], info["model_args"], hasattr(model, "set_distilled_training"))
    loader = DataLoader(EvalViews(manifest, eval_transform(model), split, rank=0, world_size=1), batch_size=o.batch_size,
                        **loader_settings(o.workers, 2, dev))
    acc = evaluate(student.heads(), loader, dev, student.eval_model())
    result = {"checkpoint": str(o.checkpoint), "model": info["model"], "split": split, **acc}
    if o.json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    heads = "".join(f", {h} head {acc[f'{h}_top1']:.2f} / {acc[f'{h}_top5']:.2f}" for h in ("cls", "dist")
                    if f"{h}_top1" in acc)
    typer.echo(f"{o.checkpoint} ({info['model']}) on {split}: top-1 {acc['top1']:.2f}, top-5 {acc['top5']:.2f}"
               f"{heads}; loss {acc['eval_loss']:.4f}")
