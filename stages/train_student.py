"""`replaykd train-student`: stage two. Train a student on the replayed views with the teacher's targets from the
cache (or from an online teacher, or none)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from replaykd import rng
from replaykd import teacher as teachers
from replaykd.device import pick_device, set_threads
from replaykd.distributed import barrier, init_distributed, is_main_process, restarted
from replaykd.engine import evaluate, train_one_epoch
from replaykd.errors import Interrupted, ReplayKDError
from replaykd.export import Preprocessing, export
from replaykd.io import check_writable
from replaykd.losses import DistillationLoss
from replaykd.manifest import Manifest
from replaykd.plots import plot_curves
from replaykd.recipe import STORED_BEFORE_MIX_MODE, Recipe
from replaykd.records import TeacherRecord
from replaykd.replay_loader import ReplayLoader
from replaykd.runs import EMA_WEIGHTS, WEIGHTS, RunFolder, mean_rate, schedule_differences
from replaykd.schedule import step_schedule
from replaykd.sinks import MetricSinks, check_available
from replaykd.student import Student, baseline_name, build_student
from replaykd.targets import OnlineTargets
from replaykd.threads import cores
from replaykd.stages.options import Distillation, StudentOptions, rerun_command

ONLINE_TOPK = 10


@dataclass
class StudentRun:
    """A student run as `run` sets it up before its first epoch (fresh or resumed), for the epochs that follow."""

    options: StudentOptions
    manifest: Manifest
    recipe: Recipe
    eval_split: str | None
    loader: ReplayLoader  # its views and teachers (several: an ensemble)
    schedule: dict  # what resume compares: world size, batch size, steps of each epoch
    student: Student
    optimizer: torch.optim.Optimizer
    ema: ModelEmaV3 | None
    lr: float  # the peak, after DeiT's linear scaling
    rows: list[dict]  # the log: one row per finished epoch
    progress: dict  # epoch and step now, for the message of an interrupted run
    device: torch.device
    rank: int
    world: int
    folder: RunFolder
    started: float  # perf_counter at the process's start of the run
    threads: int | None  # compute threads: --threads, a resumed run's own, else each epoch's share (None)
    generator: torch.Generator  # this rank's drop path masks


def online_teachers(o: StudentOptions, manifest: Manifest, recipe: Recipe, dev: torch.device) -> OnlineTargets | None:
    """The --online-teacher models, loaded and checked against the data set and views (None where the targets come
    from caches, or from the labels only)."""
    if o.online_teacher is None:
        return None
    count = len(o.online_teacher)
    given = o.topk or [None]  # one k for all teachers, or one each
    topks = [k or min(ONLINE_TOPK, manifest.num_classes) for k in (given * count if len(given) == 1 else given)]
    nets, records, weights = [], [], o.teacher_weights()
    for i, (name, k, weight) in enumerate(zip(o.online_teacher, topks, weights)):
        if k > manifest.num_classes:
            raise ReplayKDError(f"--topk {k} is more than the dataset's {manifest.num_classes} classes")
        checkpoint = o.teacher_checkpoint[i] if o.teacher_checkpoint else None
        loaded, net = teachers.prepare(name, checkpoint, o.teacher_input_size[i] if o.teacher_input_size else None,
                                       manifest.num_classes, manifest.classes, recipe.mean, recipe.std,
                                       recipe.input_size, dev)
        nets.append(net)
        records.append(TeacherRecord(loaded.identity.name, str(Path(checkpoint).resolve()) if checkpoint else None,
                                     loaded.identity.sha256, None, k, weight))
    return OnlineTargets(nets, topks, weights, records)


def replay_loader(o: StudentOptions, manifest: Manifest, recipe: Recipe, dev: torch.device, rank: int, world: int,
                  online: OnlineTargets | None) -> ReplayLoader:
    """The run's batches: its views with the teacher's targets from its caches (each checked to hold this run's
    views, refused by name otherwise), its online teachers, or none."""
    return ReplayLoader(manifest, recipe, o.cache, batch_size=o.batch_size, epochs=o.epochs, seed=o.seed,
                        split=o.split, cache_weights=o.cache_weights if o.cache is not None else None,
                        check_fingerprints=o.check_fingerprints.value, reuse_epochs=o.reuse_epochs, targets=online,
                        rank=rank, world_size=world, workers=o.workers, prefetch=o.prefetch, device=dev,
                        shuffle_seed=o.init_seed, shuffle_buffer=o.shuffle_buffer,
                        decode_memory=o.decode_memory << 20)


def main(o: StudentOptions) -> None:
    """Run stage two and print where its results are."""
    summary = run(o)
    if is_main_process() and "stopped_after" not in summary and "top1" in summary:
        heads = "".join(f", {h} head {summary[f'{h}_top1']:.2f}" for h in ("cls", "dist") if f"{h}_top1" in summary)
        typer.echo(f"done: top-1 {summary['top1']:.2f}{heads}; {summary['images_per_s']:.0f} img/s "
                   f"({summary['images_per_s_is']}); {o.out}/summary.json")
    elif is_main_process() and "stopped_after" not in summary:
        typer.echo(f"done (no evaluation split): {summary['images_per_s']:.0f} img/s; {o.out}/summary.json")


def run(o: StudentOptions) -> dict:
    """Train and evaluate; returns the summary (also OUT/summary.json). Every option is checked before OUT is
    written; a run that fails before its first epoch leaves no folder behind. Under torchrun's elastic restarts
    (`--max-restarts`) a restarted group resumes from the last checkpoint by itself."""
    t_start = time.perf_counter()
    dev = pick_device(o.device)
    rank, world = init_distributed(dev)
    set_threads(o.threads, o.workers, dev)
    manifest, recipe = Manifest.load(o.manifest), Recipe.load(o.recipe)
    eval_split = manifest.eval_split(o.eval_split)
    folder = RunFolder(o.out)
    elastic = restarted()
    resume = o.resume or (elastic and folder.has_state())
    finished = folder.summary() if resume else None
    if finished is not None:
        if finished["epochs"] != o.epochs:
            raise ReplayKDError(f"{o.out} is a finished run of {finished['epochs']} epochs; --epochs {o.epochs} cannot "
                                "continue it (its learning-rate schedule ended with its last epoch): train a new run "
                                f"with --epochs {o.epochs} in another --out")
        if rank == 0:
            typer.echo(f"{o.out} is a finished run ({finished['epochs']} epochs); nothing to resume, its results are "
                       "unchanged")
        return finished
    check_writable(o.out, "--out")
    if resume:
        folder.check_resume(o.plan(), {k: getattr(o, k) for k in o.BATCHING}, o.defaults())
    elif not elastic:
        folder.check_new()
    check_available([s for s, on in (("tensorboard", o.log_tensorboard), ("wandb", o.log_wandb)) if on])
    loader = replay_loader(o, manifest, recipe, dev, rank, world, online_teachers(o, manifest, recipe, dev))
    if o.keep_distillation_token and baseline_name(o.student) == o.student:
        raise ReplayKDError(f"--keep-distillation-token applies to a distilled DeiT student; {o.student} has no "
                            "distillation token: drop it")
    baseline = o.distillation is Distillation.none and not o.keep_distillation_token
    with rng.drawing_from(o.init_seed):  # the same initial weights on every rank
        student = build_student(o.student, manifest.num_classes, recipe.input_size, baseline, o.drop_path,
                                {k: getattr(o, k) for k in ("img_size", "patch_size", "depth", "embed_dim",
                                                            "num_heads")})
    if student.name != o.student and rank == 0:
        typer.echo(f"--distillation none: training {student.name}, DeiT's baseline without the distillation token, "
                   f"in place of {o.student} (summary.json and the checkpoint's JSON name {student.name})")
    student.model.to(dev, memory_format=torch.channels_last if dev.type == "cuda" else torch.preserve_format)
    generator = rng.rank_generator(o.init_seed, rank, dev)
    rng.own_drop_path(student.model, generator)
    lr = o.lr * o.batch_size * world / 512  # DeiT's linear scaling
    optimizer = create_optimizer_v2(student.model, "adamw", lr=lr, weight_decay=o.weight_decay)
    ema = ModelEmaV3(student.model, decay=o.model_ema) if o.model_ema else None
    schedule = {"world_size": world, "batch_size": o.batch_size, "steps_per_epoch": loader.steps_per_epoch(o.epochs),
                "views_hash": recipe.views_hash}
    if min(schedule["steps_per_epoch"]) == 0:
        raise ReplayKDError(f"an epoch holds less than one full batch of {o.batch_size} views per process "
                            f"({world} processes): use a smaller --batch-size")
    start_epoch, step, rows, threads = 0, 0, [], o.threads
    if resume:
        state = folder.restore()
        # a run from before the views were recorded here was trained on its recipe's views with pairs mixed alone
        before = dataclasses.replace(recipe, mix_mode=STORED_BEFORE_MIX_MODE).views_hash
        views = {"views_hash": before, **state["schedule"]}["views_hash"]
        if views != recipe.views_hash:
            raise ReplayKDError(f"--resume of {o.out} would replay other views than it was trained on: the recipe "
                                f"'{recipe.name}' changed since the run started (before recipes had mix_mode, pairs "
                                "were mixed one by one; the built-in recipes now mix by pairing group). Finish it "
                                "with the replaykd it was started with, or train it again")
        changed = schedule_differences(state["schedule"], schedule)
        if changed:
            raise ReplayKDError(f"--resume would change the learning-rate schedule of {o.out} ({'; '.join(changed)}); "
                                "resume with the processes and batch size it was started with")
        student.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if not rng.restore(state["rng"], rank, generator) and rank == 0:
            typer.echo(f"{o.out} was checkpointed on another kind of device: drop path draws anew from the init "
                       "seed from here on")
        start_epoch, step, rows = state["epoch"] + 1, state["step"], state["rows"]
        # the thread count enters a CPU run's sums: the run goes on with its own (up to the cores it has now),
        # whatever else runs now; on a GPU it does not, and the share is taken again
        if not threads and dev.type == "cpu" and rows[-1].get("threads"):
            threads = min(rows[-1]["threads"], cores())
        if rank == 0:
            typer.echo(f"resuming {o.out} at epoch {start_epoch} of {o.epochs} (step {step}), after its last checkpoint"
                       + (f", on {threads} compute threads as before (--threads changes it)"
                          if threads and not o.threads else ""))
    elif rank == 0:
        folder.create(o.to_config())
    progress = {"epoch": start_epoch, "step": step}
    try:
        return _train(StudentRun(o, manifest, recipe, eval_split, loader, schedule, student, optimizer, ema, lr, rows,
                                 progress, dev, rank, world, folder, t_start, threads,
                                 generator))
    except KeyboardInterrupt:
        raise Interrupted(f"train-student stopped in epoch {progress['epoch']} (step {progress['step']}); "
                          + (f"{o.out} holds its epochs before that. Continue with: {rerun_command('--resume')}"
                             if folder.has_state() else "no epoch had finished, so nothing was kept")) from None
    finally:
        if rank == 0:
            folder.discard_if_empty()


def _train(r: StudentRun) -> dict:
    """Train from `r.progress`'s epoch to the last, evaluating and checkpointing each; the summary (rank 0)."""
    o, loader, dev = r.options, r.loader, r.device
    model = torch.nn.parallel.DistributedDataParallel(r.student.model) if r.world > 1 else r.student.model
    criterion = DistillationLoss(o.distillation, o.alpha, o.tau or 1.0, r.manifest.num_classes, o.soft_scale)
    lr_at = step_schedule(r.schedule["steps_per_epoch"], o.warmup_epochs, r.lr, o.min_lr)
    eval_loader = None if r.eval_split is None else loader.eval_loader(r.eval_split)
    sinks = MetricSinks(o.out, o.log_tensorboard, o.log_wandb, o.wandb_project, o.to_config()) if r.rank == 0 else None
    if o.reuse_epochs and o.epochs > loader.view_epochs and r.rank == 0:
        typer.echo(f"--reuse-epochs: the cache holds {loader.view_epochs} epochs; student epoch e uses cached epoch "
                   f"e % {loader.view_epochs}")
    start_epoch = r.progress["epoch"]
    try:
        for epoch in range(start_epoch, o.epochs):
            r.progress["epoch"] = epoch
            loader.set_epoch(epoch)
            threads = set_threads(r.threads, o.workers, dev)  # unless fixed: follow runs started or ended since
            stats, step = train_one_epoch(model, criterion, loader, r.optimizer, dev, epoch, lr_at,
                                          r.progress["step"], o.clip_grad, r.ema, total=loader.views(),
                                          show_progress=r.rank == 0, progress=r.progress, log_every=o.log_interval)
            acc = {}
            if eval_loader is not None:
                acc = evaluate(r.student.heads(), eval_loader, dev, r.student.eval_model())
                if r.ema is not None:
                    acc.update({f"ema_{k}": v for k, v in
                                evaluate(r.student.heads(), eval_loader, dev, r.student.eval_model(r.ema.module)).items()})
            r.rows.append({"epoch": epoch, "view_epoch": loader.view_epoch(), "steps": stats.steps,
                           "loss": stats.loss, "loss_base": stats.loss_base, "loss_distill": stats.loss_distill,
                           "lr": stats.lr, "images": stats.images, "train_seconds": stats.seconds,
                           "train_cpu_seconds": stats.cpu_seconds,
                           "images_per_s": stats.images_per_s, "threads": threads, **acc,
                           # this launch's start-up: from the process's start to its first optimiser step
                           **({"startup_seconds": r.progress["first_step"]} if epoch == start_epoch else {}),
                           "step_losses": stats.step_losses})
            rng_states = rng.all_states(r.generator)
            if r.rank == 0:
                _checkpoint(r, epoch, step, rng_states)
                sinks.log(r.rows[-1])
                typer.echo(f"epoch {epoch}: loss {stats.loss:.4f} (base {stats.loss_base:.4f}, distill "
                           f"{stats.loss_distill:.4f})" + (f", top-1 {acc['top1']:.2f}" if acc else "")
                           + f", {stats.images_per_s:.0f} img/s")
            barrier()
            if o.stop_after is not None and epoch + 1 >= o.stop_after and epoch + 1 < o.epochs:
                return {"stopped_after": epoch + 1}
    finally:
        loader.close()
        if sinks is not None:
            sinks.close()
    if r.rank != 0:
        return {"rank": r.rank}
    summary = {"run": str(r.folder.path), "distillation": o.distillation.value, "source": r.loader.source.kind,
               **_teachers(r), "student": r.student.name, "epochs": o.epochs, "device": str(dev), "processes": r.world,
               "wall_seconds": time.perf_counter() - r.started,
               **{k: v for k, v in r.rows[-1].items() if k != "step_losses"}, "images_per_s": mean_rate(r.rows),
               "images_per_s_is": f"mean over {len(r.rows)} epochs, training only",
               "last_epoch_images_per_s": r.rows[-1]["images_per_s"]}
    plot_curves(r.folder.path / "log.jsonl", r.folder.path / "curves.png")
    return r.folder.finish(summary)


def _checkpoint(r: StudentRun, epoch: int, step: int, rng_states: list[dict]) -> None:
    """The weights a timm user loads (and their EMA), then the state resume reads, then the log from that state."""
    student, ema, recipe = r.student, r.ema, r.recipe
    eval_prep = Preprocessing(recipe.mean, recipe.std, recipe.input_size, recipe.interpolation, recipe.eval_crop_pct)
    for model, name in ((student.model, WEIGHTS), *(((ema.module, EMA_WEIGHTS),) if ema is not None else ())):
        export(model, r.folder.path / name, student.name, student.model_args, r.manifest.classes, eval_prep,
               epoch=epoch, trained_by="replaykd train-student", **_teachers(r))
    r.folder.save({"epoch": epoch, "step": step, "rows": r.rows, "schedule": r.schedule,
                   "model": {k: v.detach().cpu() for k, v in student.model.state_dict().items()},
                   "optimizer": r.optimizer.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                   "rng": rng_states})


def _teachers(r: StudentRun) -> dict:
    """The run's teachers as its summary and checkpoint JSON name them (nothing for a run on labels only)."""
    return {"teachers": [dataclasses.asdict(t) for t in r.loader.teachers]} if r.loader.teachers else {}
