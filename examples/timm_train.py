"""timm's train.py loop, fed by a replaykd teacher cache: timm's `create_model`, `create_optimizer_v2`,
`create_scheduler_v2` (stepped per update, as train.py does), model EMA and meters; replaykd gives the batches and
DeiT's distillation loss. The weights are saved as timm saves them and loaded back through timm for evaluation.

    python examples/timm_train.py --manifest data/digits --cache runs/demo/cache.zarr --recipe digits --epochs 10 \\
        --model deit_tiny_distilled_patch16_224 --model-kwargs '{"patch_size": 4, "depth": 4, "embed_dim": 96}'
"""
import argparse
import json
import math
import time

import torch
from timm import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, ModelEmaV3, accuracy

from replaykd import DistillationLoss, ReplayLoader, drawing_from, own_drop_path, rank_generator

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--manifest", required=True)
p.add_argument("--cache", action="append", required=True)
p.add_argument("--recipe", default="deit")
p.add_argument("--model", default="deit_tiny_distilled_patch16_224")
p.add_argument("--model-kwargs", type=json.loads, default={})
p.add_argument("--distillation", choices=["hard", "soft"], default="hard")
for name, default in {"epochs": 300, "batch-size": 256, "lr": 5e-4, "min-lr": 1e-5, "warmup-lr": 1e-6,
                      "warmup-epochs": 5, "weight-decay": 0.05, "drop-path": 0.1, "alpha": 0.5,
                      "model-ema-decay": 0.99996, "seed": 0, "init-seed": 0, "workers": 4, "log-interval": 50}.items():
    p.add_argument(f"--{name}", type=type(default), default=default)  # DeiT's and timm's defaults
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--output", default="model.pth.tar")
args = p.parse_args()
device = torch.device(args.device)

loader = ReplayLoader(args.manifest, args.recipe, args.cache, batch_size=args.batch_size, epochs=args.epochs,
                      seed=args.seed, shuffle_seed=args.init_seed, workers=args.workers, device=device)
with drawing_from(args.init_seed):  # the initial weights, from a generator this run owns (not torch's global one)
    model = create_model(args.model, num_classes=loader.num_classes, img_size=loader.recipe.input_size,
                         drop_path_rate=args.drop_path, **args.model_kwargs).to(device)
own_drop_path(model, rank_generator(args.init_seed, 0, device))  # drop path's masks (its EMA copy shares them)
if hasattr(model, "set_distilled_training"):
    model.set_distilled_training(True)
model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr * args.batch_size / 512,
                                weight_decay=args.weight_decay)
# timm's scheduler counts one number of updates per epoch; with repeated augmentation epochs differ by a step or so
updates_per_epoch = math.ceil(sum(loader.steps_per_epoch(args.epochs)) / args.epochs)
lr_scheduler, num_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                               warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                               min_lr=args.min_lr, step_on_epochs=False,
                                               updates_per_epoch=updates_per_epoch)
loss_fn = DistillationLoss(args.distillation, alpha=args.alpha, num_classes=loader.num_classes)

num_updates, epoch_losses = 0, []
for epoch in range(num_epochs):
    loader.set_epoch(epoch)
    model.train()
    losses, start = AverageMeter(), time.time()
    for batch_idx, batch in enumerate(loader):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(batch.images), batch.targets, batch.teacher).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model_ema.update(model, step=num_updates)
        num_updates += 1
        losses.update(loss.item(), len(batch))
        if batch_idx % args.log_interval == 0:
            print(f"Train: {epoch} [{batch_idx:>4d}/{len(loader)}]  Loss: {losses.val:#.3g} ({losses.avg:#.3g})  "
                  f"LR: {optimizer.param_groups[0]['lr']:.3e}")
        lr_scheduler.step_update(num_updates=num_updates)
    lr_scheduler.step(epoch + 1)
    epoch_losses.append(losses.avg)
    print(f"Train: {epoch} done  Loss: {losses.avg:#.4g}  {losses.count / (time.time() - start):.0f} img/s")
torch.save({"epoch": num_epochs, "arch": args.model, "state_dict": model.state_dict(),
            "state_dict_ema": model_ema.module.state_dict()}, args.output)

# loaded back as any timm user loads a checkpoint (timm takes its EMA weights where it holds them), and evaluated on the
# held-out split (class head and distillation head averaged, as DeiT evaluates)
model = create_model(args.model, num_classes=loader.num_classes, img_size=loader.recipe.input_size,
                     checkpoint_path=args.output, **args.model_kwargs).to(device).eval()
top1 = AverageMeter()
with torch.inference_mode():
    for images, labels in loader.eval_loader("val"):
        top1.update(accuracy(model(images.to(device)), labels.to(device), topk=(1,))[0].item(), len(labels))
loader.close()
print(json.dumps({"epochs": num_epochs, "updates": num_updates, "train_loss": epoch_losses, "val_top1": top1.avg}))
