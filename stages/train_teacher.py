"""`replaykd train-teacher`: train the demo's teacher (a small RegNetY) on the recipe's mixed, smoothed targets."""
from __future__ import annotations

import time

import torch
import typer
import yaml
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from pipeline.device import pick_device
from pipeline.engine import evaluate, train_one_epoch
from pipeline.finish import Finisher
from pipeline.io import atomic_path, write_json_atomic
from pipeline.loader import EvalViews, ReplayViews, ViewCollate, loader_settings
from pipeline.losses import LabelLoss
from pipeline.manifest import Manifest
from pipeline.models import Teacher, create_classifier
from pipeline.recipe import Recipe
from pipeline.schedule import step_schedule
from pipeline.targets import NoTargets
from stages.options import TrainTeacherOptions


def view_loader(manifest: Manifest, recipe: Recipe, o: TrainTeacherOptions, dev: torch.device) -> DataLoader:
    """The training views (`loader.dataset.set_epoch` picks the epoch), batched with the recipe's mixed,
    label-smoothed targets: what the teacher learns. Workers are kept from epoch to epoch."""
    ds = ReplayViews(manifest, recipe, o.seed, 0, rank=0, world_size=1, shuffle_buffer=512, shuffle_seed=o.seed)
    return DataLoader(ds, batch_size=o.batch_size, collate_fn=ViewCollate(manifest.num_classes, recipe.smoothing),
                      **loader_settings(o.workers, o.prefetch, dev))


def main(o: TrainTeacherOptions) -> None:
    """Train, evaluate each epoch, and write the weights with a .json (name, input size, accuracy) and a .yaml."""
    dev = pick_device(o.device)
    torch.manual_seed(o.seed)
    manifest, recipe = Manifest.load(o.data), Recipe.load(o.recipe)
    net = Teacher(create_classifier(o.model, manifest.num_classes), o.input_size or None).to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    eval_loader = DataLoader(EvalViews(manifest, recipe, "val"), batch_size=256, num_workers=min(o.workers, 1))
    loader = view_loader(manifest, recipe, o, dev)
    lr_at = step_schedule([loader.dataset.batches(o.batch_size, o.workers, e) for e in range(o.epochs)],
                          o.warmup_epochs, o.lr)
    finish, step, t0 = Finisher(recipe), 0, time.perf_counter()

    for epoch in range(o.epochs):
        loader.dataset.set_epoch(epoch)
        stats, step = train_one_epoch(net, LabelLoss(), loader, optimizer, dev, epoch, finish, NoTargets(), lr_at,
                                      step, total=loader.dataset.views())
        acc = evaluate({"teacher": lambda out: out}, eval_loader, dev, net)
        typer.echo(f"epoch {epoch}: loss {stats.loss:.4f}, val top-1 {acc['teacher_top1']:.2f}%, "
                   f"{stats.images_per_s:.0f} img/s")
    o.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(o.out) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in net.model.state_dict().items()}, str(tmp))
    info = {"model": o.model, "input_size": o.input_size or None, "num_classes": manifest.num_classes,
            "manifest_hash": manifest.hash, "recipe": recipe.name, "epochs": o.epochs, "val_top1": acc["teacher_top1"],
            "val_top5": acc["teacher_top5"], "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(o.out.with_suffix(".json"), info)
    with atomic_path(o.out.with_suffix(".yaml")) as tmp:
        tmp.write_text(yaml.safe_dump(o.to_config(), sort_keys=False))
    typer.echo(f"wrote {o.out}: {o.model}, val top-1 {acc['teacher_top1']:.2f}% ({info['seconds']} s)")
