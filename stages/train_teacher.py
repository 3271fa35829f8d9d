"""`replaykd train-teacher`: train a teacher on the recipe's mixed, smoothed targets: the demo's small RegNetY from
scratch, or a pretrained timm teacher fine-tuned on the data set's own classes (--init)."""
from __future__ import annotations

import time

import torch
import typer
import yaml

from replaykd import rng
from replaykd import teacher as teachers
from replaykd.device import pick_device, set_threads
from replaykd.engine import evaluate, train_one_epoch
from replaykd.export import Preprocessing, export
from replaykd.io import atomic_path
from replaykd.losses import DistillationLoss
from replaykd.manifest import Manifest
from replaykd.models import create_classifier
from replaykd.recipe import Recipe
from replaykd.replay_loader import ReplayLoader
from replaykd.schedule import step_schedule
from replaykd.stages.options import TrainTeacherOptions

# The side a teacher trained from scratch sees by default (RegNet's stride 32 needs at least 32 px).
SCRATCH_INPUT = 32


def view_loader(manifest: Manifest, recipe: Recipe, o: TrainTeacherOptions, dev: torch.device) -> ReplayLoader:
    """The training views in full batches with the recipe's mixed, label-smoothed targets (what the teacher learns),
    on one process; workers are kept from epoch to epoch."""
    return ReplayLoader(manifest, recipe, batch_size=o.batch_size, seed=o.seed, rank=0, world_size=1,
                        workers=o.workers, prefetch=o.prefetch, device=dev, shuffle_seed=o.seed,
                        decode_memory=o.decode_memory << 20)


def starting_model(o: TrainTeacherOptions, manifest: Manifest, recipe: Recipe) -> tuple[teachers.LoadedTeacher, str]:
    """The model to train and its name: a pretrained teacher with a head for the data set's classes (--init), the
    weights of a local file (--init-checkpoint), or a fresh --model."""
    if o.init is not None:
        loaded = teachers.load(o.init, num_classes=manifest.num_classes)
        # an hf-hub name would load its hub weights again, not the file this run writes: save the architecture
        t = loaded.identity
        return loaded, t.architecture if t.name.startswith("hf-hub:") else t.name
    if o.init_checkpoint is not None:
        loaded = teachers.load(o.model, o.init_checkpoint)
        if loaded.identity.num_classes != manifest.num_classes:
            model = create_classifier(o.model, manifest.num_classes)
            state = {k: v for k, v in loaded.model.state_dict().items() if model.state_dict()[k].shape == v.shape}
            model.load_state_dict(state, strict=False)  # all but the classifier, whose size differs
            loaded = teachers.LoadedTeacher(model, loaded.identity, None)
        return loaded, o.model
    model = create_classifier(o.model, manifest.num_classes)
    prep = Preprocessing(recipe.mean, recipe.std, SCRATCH_INPUT, recipe.interpolation, recipe.eval_crop_pct)
    identity = teachers.TeacherIdentity(o.model, o.model, None, None, "", manifest.num_classes, prep.mean, prep.std,
                                        prep.input_size, prep.interpolation)
    return teachers.LoadedTeacher(model, identity, None), o.model


def main(o: TrainTeacherOptions) -> None:
    """Train, evaluate each epoch, and write the weights with the .json timm loads them by (and the accuracy) and a
    .yaml of these options."""
    dev = pick_device(o.device)
    set_threads(o.threads, o.workers, dev)
    manifest, recipe = Manifest.load(o.data), Recipe.load(o.recipe)
    eval_split = manifest.eval_split(o.eval_split)
    with rng.drawing_from(o.seed):
        loaded, name = starting_model(o, manifest, recipe)
    prep = loaded.identity.preprocessing
    side = prep.input_size if o.input_size is None else (o.input_size or recipe.input_size)
    prep = Preprocessing(prep.mean, prep.std, side, prep.interpolation, recipe.eval_crop_pct)
    net = teachers.Teacher(loaded.model.train(), prep, recipe.mean, recipe.std).to(dev)
    rng.own_drop_path(net, rng.rank_generator(o.seed, 0, dev))
    teachers.check_input(net, recipe.input_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    loader = view_loader(manifest, recipe, o, dev)
    eval_loader = None if eval_split is None else loader.eval_loader(eval_split, 256, min(o.workers, 1))
    lr_at = step_schedule(loader.steps_per_epoch(o.epochs), o.warmup_epochs, o.lr)
    step, t0, acc = 0, time.perf_counter(), {}
    try:
        for epoch in range(o.epochs):
            loader.set_epoch(epoch)
            set_threads(o.threads, o.workers, dev)  # follow runs started or ended since the last epoch
            stats, step = train_one_epoch(net, DistillationLoss("none"), loader, optimizer, dev, epoch, lr_at, step,
                                          total=loader.views())
            if eval_loader is not None:
                acc = evaluate({"": lambda out: out}, eval_loader, dev, net)
            typer.echo(f"epoch {epoch}: loss {stats.loss:.4f}" + (f", val top-1 {acc['top1']:.2f}%" if acc else "")
                       + f", {stats.images_per_s:.0f} img/s")
    finally:
        loader.close()
    o.out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"manifest_hash": manifest.hash, "recipe": recipe.name, "epochs": o.epochs,
             "init": o.init or (str(o.init_checkpoint) if o.init_checkpoint else None),
             "val_top1": acc.get("top1"), "val_top5": acc.get("top5"), "seconds": round(time.perf_counter() - t0, 1),
             "trained_by": "replaykd train-teacher"}
    export(net.model, o.out, name, {}, manifest.classes, prep, **extra)
    with atomic_path(o.out.with_suffix(".yaml")) as tmp:
        tmp.write_text(yaml.safe_dump(o.to_config(), sort_keys=False))
    typer.echo(f"wrote {o.out}: {name}" + (f", val top-1 {acc['top1']:.2f}%" if acc else "")
               + f" ({extra['seconds']} s)")
