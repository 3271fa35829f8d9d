"""The teacher: a timm classifier named as timm names it, its identity, and its own preprocessing of the views.

Weights come from one of three places, as a timm user would give them:
- a pretrained tag, `regnety_160.deit_in1k` (DeiT's teacher; plain `regnety_160` is timm's default tag, another
  model), from the local Hugging Face cache through timm and huggingface_hub (`HF_HUB_OFFLINE=1` honoured);
- `hf-hub:ORG/NAME[@REV]`, a model repository in that cache (its config.json and weights);
- `--checkpoint FILE`, a local .pth/.safetensors (with the JSON that replaykd writes beside its own weights, when
  there is one: it gives the classes and the preprocessing).

The teacher sees each view as timm's own distillation task gives it: renormalised from the recipe's mean and std to
the teacher's, then resized to the teacher's input size with its interpolation where the sides differ.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from replaykd.errors import ReplayKDError
from replaykd.export import Preprocessing, read_info
from replaykd.models import (
    check_model_name,
    classifier_rows,
    create_classifier,
    file_sha256,
    load_weights,
    read_checkpoint,
)

# How F.interpolate resizes for each of timm's interpolation names (the others fall back to bicubic).
RESIZE = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


@dataclass(frozen=True)
class TeacherIdentity:
    """Which teacher made a store's targets: its name as given, where its weights came from, their sha256, its
    classes and its preprocessing. Two teachers are the same when architecture, weights and preprocessing are."""

    name: str
    architecture: str
    hub_id: str | None
    revision: str | None
    sha256: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    interpolation: str

    COMPARED = ("architecture", "sha256", "num_classes", "mean", "std", "input_size", "interpolation")

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherIdentity":
        """From its JSON form (tuples come back as lists)."""
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def as_dict(self) -> dict:
        """Plain JSON values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def differences(self, other: "TeacherIdentity") -> list[str]:
        """What differs from `other` (this run's), one phrase per field naming both values."""
        return [f"teacher {f}: {getattr(self, f)!r} in the store, {getattr(other, f)!r} in this run"
                for f in self.COMPARED if getattr(self, f) != getattr(other, f)]

    @property
    def preprocessing(self) -> Preprocessing:
        """The teacher's normalisation, side and resize filter."""
        return Preprocessing(self.mean, self.std, self.input_size, self.interpolation)


class Teacher(nn.Module):
    """A classifier fed as timm's distillation task feeds its teacher: views normalised with `view_mean`/`view_std`
    are renormalised to the teacher's own mean and std (where they differ) and resized to its input size."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, view_mean, view_std):
        super().__init__()
        self.model, self.preprocessing = model, preprocessing
        self.renormalise = tuple(view_mean) != tuple(preprocessing.mean) or tuple(view_std) != tuple(preprocessing.std)
        for name, values in (("view_mean", view_mean), ("view_std", view_std), ("mean", preprocessing.mean),
                             ("std", preprocessing.std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.mode = RESIZE.get(preprocessing.interpolation, "bicubic")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalise:  # timm's DistillationTeacher.normalize_input
            x = (x * self.view_std + self.view_mean - self.mean) / self.std
        side = self.preprocessing.input_size
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode=self.mode, antialias=self.mode != "nearest",
                              **({} if self.mode == "nearest" else {"align_corners": False}))
        return self.model(x)


def hub_cache() -> str:
    """Where huggingface_hub looks for cached models."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _weights_file(repo: str, revision: str | None, filename: str | None, name: str) -> Path:
    """The weights file timm loads for a hub repository, from the local Hugging Face cache (timm's order: the
    config's file, else model.safetensors before pytorch_model.bin); a missing one names the repository and file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    candidates = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    for i, candidate in enumerate(candidates):
        try:
            return Path(hf_hub_download(repo, candidate, revision=revision))
        except LocalEntryNotFoundError as exn:
            if i + 1 < len(candidates):
                continue
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
            raise ReplayKDError(
                f"teacher {name}: its weights ({repo}, {' or '.join(candidates)}) are not in the Hugging Face cache "
                f"at {hub_cache()}" + (" and downloads are off (HF_HUB_OFFLINE=1)" if offline else "")
                + f". Fetch them where there is a network (`hf download {repo} {candidates[0]}`, huggingface_hub's "
                "command line) and copy the cache here (or set HF_HUB_CACHE to a copy), or pass --checkpoint FILE"
            ) from exn
        except EntryNotFoundError:
            continue
    raise ReplayKDError(f"teacher {name}: {repo} has none of {', '.join(candidates)}")


@dataclass
class LoadedTeacher:
    """A teacher model in eval mode with its identity and, when it came from a file, that file."""

    model: nn.Module
    identity: TeacherIdentity
    checkpoint: Path | None

    def wrap(self, view_mean, view_std, device: torch.device | None = None) -> Teacher:
        """The model behind its own preprocessing, on `device` (channels_last on GPU)."""
        teacher = Teacher(self.model, self.identity.preprocessing, view_mean, view_std).eval()
        if device is not None:
            teacher = teacher.to(device, memory_format=torch.channels_last if device.type == "cuda"
                                 else torch.preserve_format)
        return teacher


def load(name: str, checkpoint: Path | None = None, input_size: int | None = None,
         num_classes: int | None = None) -> LoadedTeacher:
    """The teacher `name` (a timm name with its tag, or `hf-hub:ORG/NAME[@REV]`) with its pretrained weights from
    the Hugging Face cache, or with the weights of a local `checkpoint`. `input_size` overrides the side it sees;
    `num_classes`, when given, replaces a pretrained head of another size (fine-tuning a teacher only)."""
    check_model_name(name)
    if checkpoint is not None:
        return _from_checkpoint(name, Path(checkpoint), input_size)
    if name.startswith("hf-hub:"):
        repo, _, revision = name.split(":", 1)[1].partition("@")
        model = _create_pretrained(name, num_classes)
        weights = _weights_file(repo, revision or None, model.pretrained_cfg.get("hf_hub_filename"), name)
        hub_id = repo
    else:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not cfg.hf_hub_id:
            raise ReplayKDError(f"teacher {name}: timm has no Hugging Face weights for it; pass --checkpoint FILE")
        name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture  # the tag timm resolves to
        hub_id, revision = cfg.hf_hub_id, None
        weights = _weights_file(hub_id, None, cfg.hf_hub_filename, name)
        model = _create_pretrained(name, num_classes, cfg.num_classes, weights)
    revision = weights.parent.name if weights.parent.parent.name == "snapshots" else revision
    prep = Preprocessing.of(model.pretrained_cfg)
    if input_size:
        prep = Preprocessing(prep.mean, prep.std, input_size, prep.interpolation, prep.crop_pct)
    return LoadedTeacher(model.eval(), _identity(name, model, hub_id, revision, file_sha256(weights), prep), None)


def _create_pretrained(name: str, num_classes: int | None, pretrained_classes: int | None = None,
                       weights: Path | None = None) -> nn.Module:
    # `file` makes timm load exactly the file whose sha256 is recorded (a hub name loads through the hub cache)
    overlay = {"file": str(weights), "num_classes": pretrained_classes} if weights is not None else {}
    kwargs = {"num_classes": num_classes} if num_classes else {}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except Exception as exn:
        from huggingface_hub.errors import LocalEntryNotFoundError

        if isinstance(exn, LocalEntryNotFoundError):
            raise ReplayKDError(f"teacher {name}: its files are not in the Hugging Face cache at {hub_cache()}; "
                                "fetch them where there is a network (`hf download ORG/NAME`) and copy the cache "
                                "here, or pass --checkpoint FILE") from exn
        raise ReplayKDError(f"cannot load teacher {name}: {exn}") from exn


def _from_checkpoint(name: str, checkpoint: Path, input_size: int | None) -> LoadedTeacher:
    """A teacher from a local file: classes from its classifier, preprocessing from the JSON beside it (written by
    replaykd), else from the name's timm config."""
    state = read_checkpoint(checkpoint)
    info = read_info(checkpoint) or {}
    if info.get("model") and timm.models.split_model_name_tag(info["model"])[0] != \
            timm.models.split_model_name_tag(name)[0]:
        raise ReplayKDError(f"checkpoint {checkpoint} holds a {info['model']} (says {checkpoint.with_suffix('.json')}), "
                            f"not a {name}; pass --teacher {info['model']}")
    probe = create_classifier(name, 1, **info.get("model_args", {}))
    classes = info.get("num_classes") or classifier_rows(probe, state)
    if classes is None:
        load_weights(probe, state, checkpoint, name)  # weights of another model: named by its missing/unexpected keys
        raise ReplayKDError(f"cannot tell how many classes checkpoint {checkpoint} has (no classifier weights)")
    model = create_classifier(name, classes, **info.get("model_args", {}))
    load_weights(model, state, checkpoint, name)
    if "pretrained_cfg" in info:
        prep = Preprocessing.of(info["pretrained_cfg"])
    else:
        prep = Preprocessing.of(model.pretrained_cfg)
        if info.get("input_size"):  # written by replaykd before the JSON held the whole config
            prep = Preprocessing(prep.mean, prep.std, int(info["input_size"]), prep.interpolation, prep.crop_pct)
    if input_size:
        prep = Preprocessing(prep.mean, prep.std, input_size, prep.interpolation, prep.crop_pct)
    identity = _identity(name, model, None, None, file_sha256(checkpoint), prep)
    return LoadedTeacher(model.eval(), identity, checkpoint)


def _identity(name: str, model: nn.Module, hub_id, revision, sha256: str, prep: Preprocessing) -> TeacherIdentity:
    return TeacherIdentity(name, model.pretrained_cfg.get("architecture") or name, hub_id, revision, sha256,
                           int(model.num_classes), prep.mean, prep.std, prep.input_size, prep.interpolation)


def check_fits(teacher: LoadedTeacher, num_classes: int, classes: list[str] | None = None) -> None:
    """Refuse a teacher whose classes are not the data set's, naming both and the command that makes one that is."""
    t = teacher.identity
    info = read_info(teacher.checkpoint) if teacher.checkpoint is not None else None
    if t.num_classes != num_classes:
        raise ReplayKDError(f"teacher {t.name} has {t.num_classes} classes, the data set has {num_classes}: fine-tune "
                            f"it on the data set's classes first (`replaykd train-teacher --init {t.name}`, or "
                            "--init-checkpoint FILE) and pass the result with --checkpoint")
    if classes is not None and info and info.get("classes") and info["classes"] != classes:
        raise ReplayKDError(f"teacher checkpoint {teacher.checkpoint} was trained on other classes than the data "
                            f"set's (e.g. {info['classes'][:3]} vs {classes[:3]})")


def check_input(teacher: Teacher, view_size: int) -> None:
    """Refuse an input size the teacher cannot see: under its total stride, or one its forward rejects."""
    side = teacher.preprocessing.input_size
    reduction = max((f.get("reduction", 1) for f in getattr(teacher.model, "feature_info", None) or []), default=1)
    if side < reduction:
        raise ReplayKDError(f"teacher input size {side} px is smaller than the teacher's total stride ({reduction}): "
                            f"it would see less than one pixel of features; use --teacher-input-size >= {reduction}")
    training = teacher.training
    try:
        with torch.inference_mode():
            teacher.eval()(torch.zeros(1, 3, view_size, view_size, device=teacher.mean.device))
    except Exception as exn:
        raise ReplayKDError(f"the teacher cannot take {view_size} px views resized to {side} px: {exn}") from exn
    finally:
        teacher.train(training)


def prepare(name: str, checkpoint: Path | None, input_size: int | None, num_classes: int, classes: list[str] | None,
            view_mean, view_std, view_size: int, device: torch.device) -> tuple[LoadedTeacher, Teacher]:
    """The teacher `name` loaded (see `load`), checked against the data set's classes, wrapped for the views on
    `device`, and checked to take `view_size` px views: what a stage that runs a teacher needs before it starts."""
    loaded = load(name, checkpoint, input_size)
    check_fits(loaded, num_classes, classes)
    teacher = loaded.wrap(view_mean, view_std, device)
    check_input(teacher, view_size)
    return loaded, teacher
