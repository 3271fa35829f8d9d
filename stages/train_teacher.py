"""`replaykd train-teacher`: train the demo's teacher (a small RegNetY) with cross-entropy, offline."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import typer
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.engine import autocast, cosine_lr, evaluate, pick_device
from pipeline.io import atomic_path, write_json_atomic
from pipeline.loader import EvalViews, ReplayViews, ViewCollate
from pipeline.manifest import Manifest
from pipeline.models import Teacher, create_classifier
from pipeline.recipe import Recipe


def train_teacher(
    data: Path = typer.Option(Path("data/digits"), help="Dataset folder with manifest.json."),
    model: str = typer.Option("regnety_002", help="timm model name of the teacher."),
    recipe: str = typer.Option("digits-teacher", help="Training augmentation (recipe name or YAML file)."),
    input_size: int = typer.Option(32, min=0, help="Side the teacher sees: views are resized to it (0: as made). RegNet's stride 32 needs >= 32."),
    epochs: int = typer.Option(30, min=1, help="Training epochs."),
    batch_size: int = typer.Option(64, min=1, help="Batch size."),
    lr: float = typer.Option(2e-3, min=0.0, help="Peak AdamW learning rate."),
    weight_decay: float = typer.Option(0.05, min=0.0, help="AdamW weight decay."),
    warmup_epochs: int = typer.Option(2, min=0, help="Linear warm-up epochs before the cosine decay."),
    seed: int = typer.Option(0, min=0, help="Seed of the initialisation and of the views."),
    workers: int = typer.Option(2, min=0, help="DataLoader worker processes."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
    out: Path = typer.Option(Path("runs/teacher/teacher.safetensors"), help="Where to write the weights (safetensors); a .json beside it records name, input size and accuracy."),
) -> None:
    """Train a small timm classifier on a dataset's shards with plain cross-entropy and save it as the teacher."""
    dev = pick_device(device)
    torch.manual_seed(seed)
    manifest, rec = Manifest.load(data), Recipe.load(recipe)
    net = Teacher(create_classifier(model, manifest.num_classes), input_size or None).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    eval_loader = DataLoader(EvalViews(manifest, rec, "val"), batch_size=256, num_workers=min(workers, 1))
    steps_per_epoch = math.ceil(manifest.count("train") / batch_size)
    total, step, t0 = epochs * steps_per_epoch, 0, time.perf_counter()
    for epoch in range(epochs):
        net.train()
        ds = ReplayViews(manifest, rec, seed, [epoch], shuffle_buffer=512, shuffle_seed=seed)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=ViewCollate(manifest.num_classes, 0.0))
        bar = tqdm(loader, total=steps_per_epoch, desc=f"teacher epoch {epoch}", unit="batch", leave=False)
        for batch in bar:
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, warmup_epochs * steps_per_epoch, lr)
            with autocast(dev):
                loss = F.cross_entropy(net(batch["image"].to(dev)), batch["label"].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = evaluate({"teacher": lambda o: o}, eval_loader, dev, net)
        typer.echo(f"epoch {epoch}: loss {loss.item():.4f}, val top-1 {acc['teacher_top1']:.2f}%")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in net.model.state_dict().items()}, str(tmp))
    info = {"model": model, "input_size": input_size or None, "num_classes": manifest.num_classes,
            "manifest_hash": manifest.hash, "epochs": epochs, "val_top1": acc["teacher_top1"],
            "val_top5": acc["teacher_top5"], "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(out.with_suffix(".json"), info)
    typer.echo(f"wrote {out}: {model}, val top-1 {acc['teacher_top1']:.2f}% ({json.dumps(info['seconds'])} s)")
