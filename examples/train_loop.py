"""A plain PyTorch + timm training loop fed by a replaykd teacher cache: the model, optimiser, schedule and loss are
this file's own; replaykd gives the batches (the cached views, their mixed labels and the teacher's targets). With
the same options it trains the same weights as `replaykd train-student`, loss for loss (tests/test_api.py checks it
on the CPU; on a GPU both take the same steps, in bf16 autocast).

    python examples/train_loop.py --manifest data/digits --cache runs/demo/cache.zarr --recipe digits --epochs 2 \\
        --student deit_tiny_distilled_patch16_224 --patch-size 4 --depth 4 --embed-dim 96 --num-heads 3 --out w.pt
"""
import argparse
import json
import math

import timm
import torch
from timm.optim import create_optimizer_v2

from replaykd import (ReplayLoader, drawing_from, hard_distillation, own_drop_path, rank_generator, soft_distillation,
                      soft_target_ce)

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--manifest", required=True)
p.add_argument("--cache", action="append", required=True)  # several: an ensemble of teachers, equal weights
p.add_argument("--recipe", default="deit")
p.add_argument("--student", default="deit_tiny_distilled_patch16_224")
p.add_argument("--distillation", choices=["hard", "soft"], default="hard")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--out", required=True)
NUMBERS = {"epochs": 300, "batch-size": 256, "lr": 5e-4, "min-lr": 1e-5, "warmup-epochs": 5, "weight-decay": 0.05,
           "drop-path": 0.1, "alpha": 0.5, "seed": 0, "init-seed": 0, "workers": 4}  # --seed: the cache's views
for name, default in NUMBERS.items():
    p.add_argument(f"--{name}", type=type(default), default=default)
for name in ("threads", "patch-size", "depth", "embed-dim", "num-heads"):
    p.add_argument(f"--{name}", type=int)
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device(args.device)

loader = ReplayLoader(args.manifest, args.recipe, args.cache, batch_size=args.batch_size, epochs=args.epochs,
                      seed=args.seed, shuffle_seed=args.init_seed, workers=args.workers, device=device)
sizes = {k: v for k in ("patch_size", "depth", "embed_dim", "num_heads") if (v := getattr(args, k)) is not None}
with drawing_from(args.init_seed):  # the initial weights, from a generator this run owns (not torch's global one)
    model = timm.create_model(args.student, num_classes=loader.num_classes, drop_path_rate=args.drop_path,
                              img_size=loader.recipe.input_size, **sizes)
model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
if hasattr(model, "set_distilled_training"):
    model.set_distilled_training(True)  # a distilled DeiT answers (class head, distillation head)
own_drop_path(model, rank_generator(args.init_seed, 0, device))  # drop path's masks: train-student's rank 0
peak = args.lr * args.batch_size / 512  # DeiT's linear scaling
optimizer = create_optimizer_v2(model, "adamw", lr=peak, weight_decay=args.weight_decay)
steps = loader.steps_per_epoch(args.epochs)
total, warmup = sum(steps), sum(steps[:args.warmup_epochs])


def lr_at(step: int) -> float:
    """Linear warm-up, then cosine decay to --min-lr, per optimiser step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return args.min_lr + 0.5 * (peak - args.min_lr) * (1 + math.cos(math.pi * t))


step, log = 0, []
for epoch in range(args.epochs):
    loader.set_epoch(epoch)
    model.train()
    for batch in loader:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch.images)
            cls, dist = out if isinstance(out, tuple) else (out, out)
            kd = hard_distillation if args.distillation == "hard" else soft_distillation
            loss = (1 - args.alpha) * soft_target_ce(cls, batch.targets) + args.alpha * kd(dist, batch.teacher,
                                                                                          loader.num_classes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.append({"epoch": epoch, "step": step, "loss": loss.item()})
        step += 1
    print(f"epoch {epoch}: loss {sum(r['loss'] for r in log[-steps[epoch]:]) / steps[epoch]:.4f}")
loader.close()
torch.save(model.state_dict(), args.out)
with open(f"{args.out}.steps.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in log)
