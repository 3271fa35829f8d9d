"""timm's train.py loop, fed by a replaykd teacher cache: timm's `create_model`, `create_optimizer_v2`,
`create_scheduler_v2` (stepped per update, as train.py does), model EMA and meters; replaykd gives the batches and
DeiT's distillation loss. The weights are saved as timm saves them and loaded back through timm for evaluation.

    python examples/timm_train.py --manifest data/digits --cache runs/demo/cache.zarr --recipe digits --epochs 10 \\
        --model deit_tiny_distilled_patch16_224 --model-kwargs '{"patch_size": 4, "depth": 4, "embed_dim": 96}'
"""
import argparse
import json
import time

import torch
from timm import create_model
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, ModelEmaV3, accuracy

from replaykd import DistillationLoss, ReplayLoader

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--manifest", required=True)
p.add_argument("--cache", action="append", required=True)
p.add_argument("--recipe", default="deit")
p.add_argument("--model", default="deit_tiny_distilled_patch16_224")
p.add_argument("--model-kwargs", type=json.loads, default={})
p.add_argument("--distillation", choices=["hard", "soft"], default="hard")
p.add_argument("--epochs", type=int, default=300)
p.add_argument("--batch-size", type=int, default=256)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--warmup-epochs", type=int, default=5)
p.add_argument("--model-ema-decay", type=float, default=0.99996)
p.add_argument("--workers", type=int, default=4)
p.add_argument("--log-interval", type=int, default=50)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--output", default="model.pth.tar")
args = p.parse_args()
device = torch.device(args.device)

loader = ReplayLoader(args.manifest, args.recipe, args.cache, batch_size=args.batch_size, epochs=args.epochs,
                      workers=args.workers, device=device)
model = create_model(args.model, num_classes=loader.num_classes, img_size=loader.recipe.input_size,
                     drop_path_rate=0.1, **args.model_kwargs).to(device)
if hasattr(model, "set_distilled_training"):
    model.set_distilled_training(True)
model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr * args.batch_size / 512, weight_decay=0.05)
lr_scheduler, num_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs,
                                               warmup_epochs=args.warmup_epochs, warmup_lr=1e-6, min_lr=1e-5,
                                               step_on_epochs=False, updates_per_epoch=loader.steps(0))
loss_fn = DistillationLoss(args.distillation, alpha=0.5, num_classes=loader.num_classes)

num_updates = 0
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
    print(f"Train: {epoch} done  Loss: {losses.avg:#.4g}  {losses.count / (time.time() - start):.0f} img/s")
loader.close()
torch.save({"epoch": num_epochs, "arch": args.model, "state_dict": model.state_dict(),
            "state_dict_ema": model_ema.module.state_dict()}, args.output)

# loaded back as any timm user loads a checkpoint, and evaluated on the held-out split (class head and distillation
# head averaged, as DeiT evaluates)
model = create_model(args.model, num_classes=loader.num_classes, img_size=loader.recipe.input_size,
                     checkpoint_path=args.output, **args.model_kwargs).to(device).eval()
top1 = AverageMeter()
with torch.inference_mode():
    for images, labels in loader.eval_loader("val"):
        top1.update(accuracy(model(images.to(device)), labels.to(device), topk=(1,))[0].item(), len(labels))
print(json.dumps({"epochs": num_epochs, "updates": num_updates, "train_loss": losses.avg, "val_top1": top1.avg}))
