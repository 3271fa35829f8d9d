"""`replaykd train-student`: stage two. Train a distilled DeiT on the replayed views with cached targets."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import typer
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.cache import TeacherCache
from pipeline.engine import autocast, barrier, cosine_lr, evaluate, init_distributed, pick_device, to_input
from pipeline.errors import ReplayKDError
from pipeline.io import atomic_path, write_json_atomic
from pipeline.loader import EvalViews, ReplayViews, ViewCollate
from pipeline.losses import DistillationLoss, teacher_targets
from pipeline.manifest import Manifest
from pipeline.models import StudentHeads, create_student, load_teacher
from pipeline.recipe import Recipe
from pipeline.targets import CHECK_EVERY, CachedTargets

HEADS = {"cls": lambda o: o[0], "dist": lambda o: o[1], "avg": lambda o: (o[0] + o[1]) / 2}
# Options that fix the epoch plan: a resumed run must have the same.
PLAN = ("manifest", "split", "recipe", "seed", "init_seed", "epochs", "student", "img_size", "patch_size", "depth",
        "embed_dim", "num_heads", "batch_size", "lr", "weight_decay", "warmup_epochs", "min_lr", "drop_path",
        "distillation", "alpha", "tau", "cache", "online_teacher", "reuse_epochs", "clip_grad", "model_ema")


@dataclass
class StudentOptions:
    """Stage two's configuration, from the CLI options (DeiT's defaults)."""

    out: Path
    manifest: Path = Path("data/digits")
    cache: Path | None = None
    online_teacher: str | None = None
    teacher_checkpoint: Path | None = None
    teacher_input_size: int | None = None
    topk: int = 10
    split: str = "train"
    recipe: str = "deit"
    seed: int = 0
    init_seed: int = 0
    epochs: int = 300
    reuse_epochs: bool = False
    student: str = "deit_tiny_distilled_patch16_224"
    img_size: int | None = None
    patch_size: int | None = None
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    distillation: str = "hard"
    alpha: float = 0.5
    tau: float = 1.0
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    min_lr: float = 1e-5
    drop_path: float = 0.1
    clip_grad: float | None = None
    model_ema: float | None = None
    check_fingerprints: str = "all"
    shuffle_buffer: int = 1024
    workers: int = 4
    device: str = "auto"
    resume: bool = False
    stop_after: int | None = None

    def plan(self) -> dict:
        """The options a resumed run must share, as JSON values."""
        d = dataclasses.asdict(self)
        return {k: str(d[k]) if isinstance(d[k], Path) else d[k] for k in PLAN}


def check_cache(cache: TeacherCache, manifest: Manifest, recipe: Recipe, o: StudentOptions) -> None:
    """Refuse a store that does not fit this run's data, recipe, seed, split, classes or epochs."""
    c = cache.config
    wrong = [f"{what}: {have} in the store, {want} here" for what, have, want in (
        ("manifest hash", c.manifest_hash[:16], manifest.hash[:16]), ("recipe hash", c.recipe_hash[:16], recipe.hash[:16]),
        ("run seed", c.run_seed, o.seed), ("split", c.split, o.split), ("classes", c.num_classes, manifest.num_classes),
    ) if have != want]
    if wrong:
        raise ReplayKDError(f"cache {cache.path} does not fit this run: " + "; ".join(wrong))
    missing = cache.missing()
    if missing:
        shown = ", ".join(f"(epoch {e}, {cache.shards[s]})" for e, s in missing[:10])
        raise ReplayKDError(f"cache {cache.path} is incomplete: {len(missing)} units not done, e.g. {shown}; "
                            "rerun the same teacher-cache command to finish it")
    if o.epochs > c.epochs and not o.reuse_epochs:
        raise ReplayKDError(f"{o.epochs} epochs asked for but {cache.path} holds {c.epochs}; grow the cache "
                            "(teacher-cache --epochs N) or pass --reuse-epochs to cycle the cached epochs")


def save_checkpoint(run_dir: Path, model, optimizer, ema, epoch: int, step: int) -> None:
    """Weights (safetensors) then optimiser state; the state file, written last, names the finished epoch."""
    with atomic_path(run_dir / "checkpoint.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    state = {"epoch": epoch, "step": step, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
             "ema": ema.state_dict() if ema is not None else None}
    with atomic_path(run_dir / "train_state.pt") as tmp:
        torch.save(state, tmp)


def run(o: StudentOptions) -> dict:
    """Train and evaluate; returns the final summary (also written to OUT/summary.json)."""
    if (o.cache is None) == (o.online_teacher is None) and o.distillation != "none":
        raise ReplayKDError("give exactly one of --cache (stage two) and --online-teacher (teacher in the loop), "
                            "or --distillation none")
    if o.check_fingerprints not in CHECK_EVERY:
        raise ReplayKDError(f"--check-fingerprints must be all, sample or off, got {o.check_fingerprints!r}")
    t_start = time.perf_counter()
    dev = pick_device(o.device)
    rank, world = init_distributed(dev)
    manifest, recipe = Manifest.load(o.manifest), Recipe.load(o.recipe)
    run_dir = Path(o.out)
    cached_epochs, annotate, teacher, topk = o.epochs, None, None, o.topk
    if o.cache is not None and o.distillation != "none":
        cache = TeacherCache.open(o.cache)
        check_cache(cache, manifest, recipe, o)
        cached_epochs, annotate, topk = cache.config.epochs, CachedTargets(o.cache), cache.config.topk
    elif o.online_teacher is not None and o.distillation != "none":
        if o.teacher_checkpoint is None:
            raise ReplayKDError("--online-teacher needs --teacher-checkpoint")
        teacher = load_teacher(o.online_teacher, o.teacher_checkpoint, manifest.num_classes, o.teacher_input_size, dev)
    torch.manual_seed(o.init_seed)
    student = create_student(o.student, manifest.num_classes, o.img_size or recipe.input_size, o.patch_size,
                             o.drop_path, depth=o.depth, embed_dim=o.embed_dim, num_heads=o.num_heads).to(dev)
    if dev.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    lr = o.lr * o.batch_size * world / 512  # DeiT's linear scaling
    optimizer = create_optimizer_v2(student, "adamw", lr=lr, weight_decay=o.weight_decay)
    ema = ModelEmaV3(student, decay=o.model_ema) if o.model_ema else None
    start_epoch, step = 0, 0
    if o.resume:
        state_file = run_dir / "train_state.pt"
        if not state_file.exists():
            raise ReplayKDError(f"nothing to resume in {run_dir} (no train_state.pt)")
        saved = json.loads((run_dir / "config.json").read_text())["plan"]
        diff = [k for k in PLAN if saved.get(k) != o.plan()[k]]
        if diff:
            raise ReplayKDError(f"--resume with a different plan than {run_dir} was started with: {', '.join(diff)}")
        student.load_state_dict(load_file(str(run_dir / "checkpoint.safetensors")))
        state = torch.load(state_file, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step = state["epoch"] + 1, state["step"]
    elif rank == 0:
        if (run_dir / "train_state.pt").exists():
            raise ReplayKDError(f"{run_dir} holds a run already; pass --resume to continue it, or choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", {"plan": o.plan(), "options": json.loads(json.dumps(dataclasses.asdict(o), default=str))})
        (run_dir / "log.jsonl").write_text("")
    model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    loss_fn = DistillationLoss(o.distillation, o.alpha, o.tau, manifest.num_classes)
    collate = ViewCollate(manifest.num_classes, recipe.smoothing)
    steps_per_epoch = math.ceil(manifest.count(o.split) / (o.batch_size * world))
    total_steps = o.epochs * steps_per_epoch
    eval_loader = DataLoader(EvalViews(manifest, recipe, "val"), batch_size=o.batch_size, num_workers=min(o.workers, 2))
    if o.reuse_epochs and o.epochs > cached_epochs and rank == 0:
        typer.echo(f"--reuse-epochs: the cache holds {cached_epochs} epochs; student epoch e uses cached epoch e % {cached_epochs}")
    last = {}
    for epoch in range(start_epoch, o.epochs):
        view_epoch = epoch % cached_epochs
        ds = ReplayViews(manifest, recipe, o.seed, [view_epoch], o.split, rank=rank, world_size=world,
                         shuffle_buffer=o.shuffle_buffer, shuffle_seed=o.init_seed + epoch, annotate=annotate,
                         fingerprint_every=CHECK_EVERY[o.check_fingerprints] if annotate else 0)
        loader = DataLoader(ds, batch_size=o.batch_size, num_workers=o.workers, collate_fn=collate,
                            pin_memory=dev.type == "cuda")
        model.train()
        sums, images, t0 = torch.zeros(3, dtype=torch.float64), 0, time.perf_counter()
        bar = tqdm(total=len(ds), desc=f"epoch {epoch}", unit="img", unit_scale=True, leave=False, disable=rank != 0)
        join = torch.distributed.algorithms.Join([model]) if world > 1 else nullcontext()
        with join:
            for batch in loader:
                cur_lr = cosine_lr(step, total_steps, o.warmup_epochs * steps_per_epoch, lr, o.min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = cur_lr
                x = to_input(batch["image"], dev)
                target = batch["target"].to(dev, non_blocking=True)
                t_probs = t_classes = None
                if teacher is not None:
                    with torch.no_grad(), autocast(dev):
                        t_probs, t_classes = teacher_targets(teacher(x), topk)
                elif annotate is not None:
                    t_probs, t_classes = batch["t_probs"].to(dev, non_blocking=True), batch["t_classes"].to(dev, non_blocking=True)
                with autocast(dev):
                    parts = loss_fn(model(x), target, t_probs, t_classes)
                if not torch.isfinite(parts["loss"]):
                    raise ReplayKDError(f"loss is {parts['loss'].item()} at epoch {epoch}, step {step}; lower --lr or set --clip-grad")
                optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
                if o.clip_grad:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), o.clip_grad)
                optimizer.step()
                if ema is not None:
                    ema.update(student, step=step)
                step += 1
                n = len(x)
                sums += torch.tensor([parts[k].item() * n for k in ("loss", "base", "distill")], dtype=torch.float64)
                images += n
                bar.update(n)
                bar.set_postfix(loss=f"{parts['loss'].item():.3f}", lr=f"{cur_lr:.2e}")
        bar.close()
        seconds = time.perf_counter() - t0
        totals = torch.cat([sums, torch.tensor([images, seconds], dtype=torch.float64)])
        if world > 1:
            totals = totals.to(dev)
            dist.all_reduce(totals)
            totals = totals.cpu()
        images_all = totals[3].item()
        acc = evaluate(HEADS, eval_loader, dev, StudentHeads(student))
        if ema is not None:
            acc.update({f"ema_{k}": v for k, v in evaluate(HEADS, eval_loader, dev, StudentHeads(ema.module)).items()})
        last = {"epoch": epoch, "view_epoch": view_epoch, "loss": totals[0].item() / images_all,
                "loss_base": totals[1].item() / images_all, "loss_distill": totals[2].item() / images_all,
                "lr": cur_lr, "images": int(images_all), "train_seconds": seconds,
                "images_per_s": images_all / seconds, **acc}
        if rank == 0:
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            save_checkpoint(run_dir, student, optimizer, ema, epoch, step)
            typer.echo(f"epoch {epoch}: loss {last['loss']:.4f} (base {last['loss_base']:.4f}, distill {last['loss_distill']:.4f}), "
                       f"top-1 cls {acc['cls_top1']:.2f} dist {acc['dist_top1']:.2f} avg {acc['avg_top1']:.2f}, "
                       f"{last['images_per_s']:.0f} img/s")
        barrier()
        if o.stop_after is not None and epoch + 1 >= o.stop_after and epoch + 1 < o.epochs:
            return {"stopped_after": epoch + 1}
    summary = {"run": str(run_dir), "distillation": o.distillation, "source": "cache" if annotate else
               ("online" if teacher is not None else "labels"), "student": o.student, "epochs": o.epochs,
               "device": str(dev), "processes": world, "wall_seconds": time.perf_counter() - t_start, **last}
    if rank == 0:
        write_json_atomic(run_dir / "summary.json", summary)
        from pipeline.plots import plot_curves
        plot_curves(run_dir / "log.jsonl", run_dir / "curves.png")
    return summary


def train_student(
    out: Path = typer.Option(..., help="Run folder: config.json, log.jsonl, checkpoints, curves.png, summary.json."),
    manifest: Path = typer.Option(Path("data/digits"), help="Dataset folder with manifest.json."),
    cache: Path = typer.Option(None, help="Teacher cache from stage one (its manifest, recipe, seed and split must match)."),
    online_teacher: str = typer.Option(None, help="Run this timm teacher in the loop instead of reading a cache (DeiT's way; the baseline)."),
    teacher_checkpoint: Path = typer.Option(None, help="Weights of --online-teacher (a local file)."),
    teacher_input_size: int = typer.Option(None, help="Side the online teacher sees (default: from the checkpoint's .json)."),
    topk: int = typer.Option(10, min=1, help="Top-k of the online teacher's targets (as a cache would store)."),
    split: str = typer.Option("train", help="Training split."),
    recipe: str = typer.Option("deit", help="Augmentation recipe (must be the cache's)."),
    seed: int = typer.Option(0, min=0, help="Run seed of the views (must be the cache's)."),
    init_seed: int = typer.Option(0, min=0, help="Seed of the student's initialisation, drop path and batch order."),
    epochs: int = typer.Option(300, min=1, help="Training epochs (DeiT: 300)."),
    reuse_epochs: bool = typer.Option(False, "--reuse-epochs", help="Allow more epochs than cached by cycling the cached epochs."),
    student: str = typer.Option("deit_tiny_distilled_patch16_224", help="timm distilled DeiT (deit_tiny/small/base_distilled_patch16_224)."),
    img_size: int = typer.Option(None, help="Student input size (default: the recipe's)."),
    patch_size: int = typer.Option(None, help="Patch size (default: the model's, 16)."),
    depth: int = typer.Option(None, help="Override the number of blocks (small demo students)."),
    embed_dim: int = typer.Option(None, help="Override the embedding width."),
    num_heads: int = typer.Option(None, help="Override the attention heads."),
    distillation: str = typer.Option("hard", help="hard (DeiT's: CE to the teacher's top-1), soft (KL at --tau to the densified top-k) or none (labels only)."),
    alpha: float = typer.Option(0.5, min=0.0, max=1.0, help="Weight of the distillation term."),
    tau: float = typer.Option(1.0, min=1e-3, help="Temperature of soft distillation."),
    batch_size: int = typer.Option(256, min=1, help="Batch size per process."),
    lr: float = typer.Option(5e-4, min=0.0, help="Base learning rate, scaled by batch_size * processes / 512 (DeiT)."),
    weight_decay: float = typer.Option(0.05, min=0.0, help="AdamW weight decay (not on norms, biases, tokens)."),
    warmup_epochs: int = typer.Option(5, min=0, help="Linear warm-up epochs."),
    min_lr: float = typer.Option(1e-5, min=0.0, help="Learning rate at the end of the cosine schedule."),
    drop_path: float = typer.Option(0.1, min=0.0, max=1.0, help="Stochastic depth rate."),
    clip_grad: float = typer.Option(None, help="Clip the gradient norm to this value (off by default)."),
    model_ema: float = typer.Option(None, help="Keep an EMA of the weights with this decay (e.g. 0.99996) and evaluate it too."),
    check_fingerprints: str = typer.Option("all", help="Compare replayed views' fingerprints with the cache: all, sample (1 in 16) or off."),
    shuffle_buffer: int = typer.Option(1024, min=0, help="Views shuffled through a buffer of this size."),
    workers: int = typer.Option(4, min=0, help="DataLoader worker processes per process."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda' (bf16 autocast and channels_last on GPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last finished epoch."),
    stop_after: int = typer.Option(None, help="Stop after this many finished epochs (continue later with --resume)."),
) -> None:
    """Stage two: train a distilled DeiT on the replayed views, with the teacher's targets from the cache."""
    opts = StudentOptions(**{k: v for k, v in locals().items()})
    summary = run(opts)
    if int(os.environ.get("RANK", "0")) == 0 and "stopped_after" not in summary:
        typer.echo(f"done: top-1 cls {summary['cls_top1']:.2f}, dist {summary['dist_top1']:.2f}, avg {summary['avg_top1']:.2f}; "
                   f"{summary['images_per_s']:.0f} img/s; {opts.out}/summary.json")
