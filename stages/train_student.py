"""`replaykd train-student`: stage two. Train a distilled DeiT on the replayed views with cached targets."""
from __future__ import annotations

import time

import torch
import typer
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from pipeline.cache import CacheRequest, TeacherCache
from pipeline.device import pick_device
from pipeline.distributed import barrier, init_distributed, is_main_process
from pipeline.engine import evaluate, train_one_epoch
from pipeline.errors import ReplayKDError
from pipeline.finish import Finisher
from pipeline.loader import EvalViews, ReplayViews, ViewCollate, loader_settings
from pipeline.losses import DistillationLoss
from pipeline.manifest import Manifest
from pipeline.models import StudentHeads, create_student, load_teacher
from pipeline.plots import plot_curves
from pipeline.recipe import Recipe
from pipeline.runs import RunFolder, mean_rate
from pipeline.schedule import step_schedule
from pipeline.targets import CachedTargets, NoTargets, OnlineTargets, TargetSource
from stages.options import Distillation, StudentOptions

HEADS = {"cls": lambda o: o[0], "dist": lambda o: o[1], "avg": lambda o: (o[0] + o[1]) / 2}
ONLINE_TOPK = 10


def target_source(o: StudentOptions, manifest: Manifest, recipe: Recipe, dev: torch.device) -> tuple[TargetSource, int]:
    """Where the teacher's targets come from, and how many epochs of views it holds (a cache's, else the run's)."""
    if o.distillation is Distillation.none:
        return NoTargets(), o.epochs
    if o.cache is not None:
        cache = TeacherCache.open(o.cache)
        if o.epochs > cache.config.epochs and not o.reuse_epochs:
            raise ReplayKDError(f"{o.epochs} epochs asked for but {cache.path} holds {cache.config.epochs}; grow the "
                                "cache (teacher-cache --epochs N) or pass --reuse-epochs to cycle the cached epochs")
        cache.require(CacheRequest.of(manifest, o.split, recipe, o.seed), epochs=o.epochs, complete=True)
        return CachedTargets(o.cache, o.check_fingerprints), cache.config.epochs
    topk = o.topk or min(ONLINE_TOPK, manifest.num_classes)
    if topk > manifest.num_classes:
        raise ReplayKDError(f"--topk {topk} is more than the dataset's {manifest.num_classes} classes")
    teacher = load_teacher(o.online_teacher, o.teacher_checkpoint, manifest.num_classes, o.teacher_input_size, dev)
    return OnlineTargets(teacher, topk), o.epochs


def main(o: StudentOptions) -> None:
    """Run stage two and print where its results are."""
    summary = run(o)
    if is_main_process() and "stopped_after" not in summary:
        typer.echo(f"done: top-1 cls {summary['cls_top1']:.2f}, dist {summary['dist_top1']:.2f}, avg "
                   f"{summary['avg_top1']:.2f}; {summary['images_per_s']:.0f} img/s ({summary['images_per_s_is']}); "
                   f"{o.out}/summary.json")


def run(o: StudentOptions) -> dict:
    """Train and evaluate; returns the summary (also OUT/summary.json). Every option is checked before OUT is
    written; a run that fails before its first epoch leaves no folder behind."""
    t_start = time.perf_counter()
    dev = pick_device(o.device)
    rank, world = init_distributed(dev)
    manifest, recipe = Manifest.load(o.manifest), Recipe.load(o.recipe)
    folder = RunFolder(o.out)
    finished = folder.summary() if o.resume else None
    if finished is not None:
        if rank == 0:
            typer.echo(f"{o.out} is a finished run ({finished['epochs']} epochs); nothing to resume, its results are "
                       "unchanged")
        return finished
    if o.resume:
        folder.check_resume(o.plan())
    else:
        folder.check_new()
    source, view_epochs = target_source(o, manifest, recipe, dev)
    torch.manual_seed(o.init_seed)
    student = create_student(o.student, manifest.num_classes, o.img_size or recipe.input_size, o.patch_size,
                             o.drop_path, depth=o.depth, embed_dim=o.embed_dim, num_heads=o.num_heads).to(dev)
    if dev.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    lr = o.lr * o.batch_size * world / 512  # DeiT's linear scaling
    optimizer = create_optimizer_v2(student, "adamw", lr=lr, weight_decay=o.weight_decay)
    ema = ModelEmaV3(student, decay=o.model_ema) if o.model_ema else None
    start_epoch = step = 0
    if o.resume:
        at = folder.restore(student, optimizer, ema)
        start_epoch, step = at.epoch, at.step
        if rank == 0:
            typer.echo(f"resuming {o.out} at epoch {start_epoch} of {o.epochs} (step {step}), after its last checkpoint")
    elif rank == 0:
        folder.create(o.to_config())
    try:
        return _train(o, manifest, recipe, source, view_epochs, student, optimizer, ema, lr, start_epoch, step, dev,
                      rank, world, folder, t_start)
    except BaseException:
        if rank == 0:
            folder.discard_if_empty()
        raise


def _train(o: StudentOptions, manifest: Manifest, recipe: Recipe, source: TargetSource, view_epochs: int, student,
           optimizer, ema, lr: float, start_epoch: int, step: int, dev: torch.device, rank: int, world: int,
           folder: RunFolder, t_start: float) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    criterion = DistillationLoss(o.distillation, o.alpha, o.tau, manifest.num_classes)
    collate, finish = ViewCollate(manifest.num_classes, recipe.smoothing), Finisher(recipe)

    ds = ReplayViews(manifest, recipe, o.seed, start_epoch, o.split, rank=rank, world_size=world,
                     view_epochs=view_epochs, shuffle_buffer=o.shuffle_buffer, shuffle_seed=o.init_seed,
                     annotate=source.annotator(), fingerprint_every=source.fingerprint_every())
    # Every rank takes the same number of steps per epoch (EpochPlan), so the schedule is known exactly.
    lr_at = step_schedule([ds.batches(o.batch_size, o.workers, e) for e in range(o.epochs)], o.warmup_epochs, lr,
                          o.min_lr)
    loader = DataLoader(ds, batch_size=o.batch_size, collate_fn=collate, **loader_settings(o.workers, o.prefetch, dev))
    eval_loader = DataLoader(EvalViews(manifest, recipe, "val"), batch_size=o.batch_size,
                             **loader_settings(min(o.workers, 2), o.prefetch, dev))
    if o.reuse_epochs and o.epochs > view_epochs and rank == 0:
        typer.echo(f"--reuse-epochs: the cache holds {view_epochs} epochs; student epoch e uses cached epoch "
                   f"e % {view_epochs}")
    for epoch in range(start_epoch, o.epochs):
        ds.set_epoch(epoch)
        stats, step = train_one_epoch(model, criterion, loader, optimizer, dev, epoch, finish, source, lr_at, step,
                                      o.clip_grad, ema, total=ds.views(), show_progress=rank == 0)
        acc = evaluate(HEADS, eval_loader, dev, StudentHeads(student))
        if ema is not None:
            acc.update({f"ema_{k}": v for k, v in evaluate(HEADS, eval_loader, dev, StudentHeads(ema.module)).items()})
        row = {"epoch": epoch, "view_epoch": ds.plan().epoch, "steps": stats.steps, "loss": stats.loss,
               "loss_base": stats.loss_base, "loss_distill": stats.loss_distill, "lr": stats.lr, "images": stats.images,
               "train_seconds": stats.seconds, "images_per_s": stats.images_per_s, **acc}
        if rank == 0:
            folder.append_log(row)
            folder.save(student, optimizer, ema, epoch, step)
            typer.echo(f"epoch {epoch}: loss {stats.loss:.4f} (base {stats.loss_base:.4f}, distill "
                       f"{stats.loss_distill:.4f}), top-1 cls {acc['cls_top1']:.2f} dist {acc['dist_top1']:.2f} avg "
                       f"{acc['avg_top1']:.2f}, {stats.images_per_s:.0f} img/s")
        barrier()
        if o.stop_after is not None and epoch + 1 >= o.stop_after and epoch + 1 < o.epochs:
            return {"stopped_after": epoch + 1}
    if rank != 0:
        return {"rank": rank}
    log = folder.log()
    summary = {"run": str(folder.path), "distillation": o.distillation.value, "source": source.kind,
               "student": o.student, "epochs": o.epochs, "device": str(dev), "processes": world,
               "wall_seconds": time.perf_counter() - t_start, **{k: v for k, v in log[-1].items()},
               "images_per_s": mean_rate(log), "images_per_s_is": f"mean over {len(log)} epochs, training only",
               "last_epoch_images_per_s": log[-1]["images_per_s"]}
    plot_curves(folder.path / "log.jsonl", folder.path / "curves.png")
    return folder.finish(summary)
