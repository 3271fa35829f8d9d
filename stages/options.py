"""Every command's options: one dataclass per command, the single source of its flags, defaults, help and bounds.

`stages/cli.py` derives each command's command line from these classes; `--config FILE.yaml` fills the same
fields (flags given on the command line win), and `Options.from_mapping` checks every value, whatever its origin,
before a command starts. This module imports nothing heavy, so `replaykd --help` stays fast.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from replaykd.errors import ReplayKDError
from replaykd.storage import Location, as_location

# DeiT's teacher, with its tag pinned: plain `regnety_160` resolves to another tag in timm.
DEIT_TEACHER = "regnety_160.deit_in1k"
# How far --cache-weights may sum from 1.
WEIGHT_TOLERANCE = 1e-6


class Device(str, Enum):
    """Where a command computes."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Distillation(str, Enum):
    """DeiT's distillation modes."""

    hard = "hard"
    soft = "soft"
    none = "none"


class SoftScale(str, Enum):
    """What soft distillation's summed KL term is divided by."""

    deit = "deit"
    batchmean = "batchmean"


class FingerprintCheck(str, Enum):
    """How many replayed views stage two checks against the cache's fingerprints."""

    all = "all"
    sample = "sample"
    off = "off"


def opt(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
        flags: tuple[str, ...] = (), argument: bool = False):
    """A field with its command-line help, bounds (checked for every value, from a flag or a config file), extra
    flag names, and whether it is a positional argument."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "flags": flags,
                                            "argument": argument})


# The loader options train-teacher, teacher-cache and train-student share: one flag, help and bounds each, so the
# commands cannot drift apart (a command picks its own default where they differ).
def workers_opt(default: int):
    """The --workers field of a command that makes views, with that command's default."""
    return opt(default, "DataLoader worker processes making the views, per process (kept for the whole run).", min=0)


def prefetch_opt():
    """The --prefetch field of a command that makes views."""
    return opt(2, "Batches each loader worker keeps ready (DataLoader prefetch_factor).", min=1)


def max_pixels_opt():
    """The --max-pixels field of the commands that check images."""
    return opt(89_478_485, "Refuse an image of more pixels than this, width x height, read from its header (Pillow's "
                           "decompression-bomb limit; decoded, an image takes 4 bytes a pixel). Pillow itself refuses "
                           "more than twice its limit, whatever this says.", min=1)


def threads_opt():
    """The --threads field of a command that computes beside its loader workers."""
    return opt(None, "Compute threads of this process (default: its share of the cores among the replaykd processes "
                     "computing on this machine, taken again each epoch: all of them for one run alone, half each "
                     "for two; at least 1).", min=1)


def decode_memory_opt():
    """The --decode-memory field of a command that makes views."""
    return opt(96, "MB of decoded images each loader worker holds at most: an image decoded once serves all the views "
                   "made from it while they fit (stage one: every epoch of its shard; stage two and train-teacher: "
                   "its repeats), else a unit's pairing groups (about 64 samples, mixing partners inside) are decoded "
                   "one after another, each image still once; only a budget below one group's images decodes some "
                   "again.", min=1)


# Keys of storage options never written into a store, a run folder or a log (credentials).
SECRET = re.compile(r"key|secret|token|password|credential|session", re.I)
STORAGE_HELP = ("Options of the object store (fsspec/s3fs keyword arguments) as JSON, e.g. '{\"endpoint_url\": "
                "\"http://minio:9000\", \"profile\": \"research\"}' (or a mapping under storage_options: in "
                "--config, for the commands that take one); credentials otherwise come from the usual environment "
                "(AWS_* variables, profiles, AWS_ENDPOINT_URL) and are never written anywhere.")


def _base(hint) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed); a path-or-URL field's type is `Location`; a list
    field's stays `list[item]`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        return (Location if set(args) == {Path, str} else args[0]), optional
    return hint, False


def public(value):
    """`value` without the entries of secret-looking keys, at any depth (what a config written to disk keeps)."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items() if not SECRET.search(str(k))}
    return value


def list_item(hint) -> Any | None:
    """The item type of a list field (a flag given once per value, in order), or None for any other field."""
    base, _ = _base(hint)
    return typing.get_args(base)[0] if typing.get_origin(base) is list else None


def _convert(name: str, hint, value, where: str):
    base, optional = _base(hint)
    flag = "--" + name.replace("_", "-")
    item = list_item(hint)
    if item is not None and value is not None:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if item in (int, float):  # numbers may also come comma-separated: --cache-weights 0.5,0.5
            values = [part for v in values for part in (v.split(",") if isinstance(v, str) else [v])]
        value = [_convert(name, item, v, where) for v in values] or None
    if value is None:
        if optional:
            return None
        raise ReplayKDError(f"{flag} needs a value ({where})")
    if item is not None:
        return value
    if isinstance(base, type) and issubclass(base, Enum):
        try:
            return base(getattr(value, "value", value))
        except ValueError:
            raise ReplayKDError(f"{flag} must be one of {', '.join(m.value for m in base)}, got {value!r} ({where})") from None
    if base is bool:
        if not isinstance(value, bool):
            raise ReplayKDError(f"{flag} must be true or false, got {value!r} ({where})")
        return value
    try:
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is Path:
            return Path(value)
        if base is Location:
            return as_location(str(value))
        if base is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        return base(value)
    except (TypeError, ValueError):
        kind = "a JSON mapping" if base is dict else "a path or URL" if base is Location else getattr(base, "__name__", base)
        raise ReplayKDError(f"{flag} must be {kind}, got {value!r} ({where})") from None


def _shell(words: list) -> str:
    """`replaykd WORDS...`, quoted for a POSIX shell."""
    return shlex.join(["replaykd", *map(str, words)])


def _flag_value(value) -> str:
    """An option's value as its flag takes it: mappings as JSON, without secret-looking keys (credentials come from
    the environment instead)."""
    return json.dumps(public(value)) if isinstance(value, (dict, list)) else str(value)


def command_line(command: str, cls: type[Options], values: dict) -> str:
    """The replaykd command line that runs `command` (e.g. 'teacher-cache', whose options are `cls`) with `values`
    (field name -> value, as `Options.to_config` records them): unset options and switches at their default are left
    out."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    words = command.split()
    for name, value in values.items():
        f = fields.get(name)
        flag = (f.metadata["flags"] or ("",))[0] if f is not None else ""
        flag = flag or "--" + name.replace("_", "-")
        if value is None or (value is False and (f is None or f.default is not True)):
            continue
        if f is not None and list_item(cls.hints()[name]) is not None:  # the flag once per value, in order
            words += [w for v in (value if isinstance(value, list) else [value]) for w in (flag, _flag_value(v))]
            continue
        words += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, _flag_value(value)]
    return _shell(words)


def rerun_command(flag: str = "") -> str:
    """How to run this command again (with `flag` added when missing), for messages that say how to continue; the
    secret-looking keys of --storage-options are left out."""
    argv = list(sys.argv[1:])
    for i, arg in enumerate(argv):
        given, inline, text = arg.partition("=")
        if given != "--storage-options" or (not inline and i + 1 == len(argv)):
            continue
        at, text = (i, text) if inline else (i + 1, argv[i + 1])
        try:
            shown = _flag_value(json.loads(text))
        except ValueError:
            shown = "..."
        argv[at] = f"--storage-options={shown}" if inline else shown
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "the same torchrun command" + (f" with {flag}" if flag and flag not in argv else "")
    return _shell([*argv, *([flag] if flag and flag not in argv else [])])


@dataclass
class Options:
    """Base of the per-command options."""

    # Fields that fix a training run's plan: a resumed run must have the same values.
    PLAN: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def hints(cls) -> dict:
        """Field name -> type, resolved."""
        return typing.get_type_hints(cls)

    @classmethod
    def from_mapping(cls, values: dict, where: str = "the command line"):
        """Options from a mapping of field names (a config file's or the command line's); every value is checked."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ReplayKDError(f"unknown options {', '.join(unknown)} ({where}); known: {', '.join(known)}")
        hints, out = cls.hints(), {}
        for name, f in known.items():
            if name in values:
                out[name] = _convert(name, hints[name], values[name], where)
            elif f.default is dataclasses.MISSING:
                raise ReplayKDError(f"missing option --{name.replace('_', '-')} (on the command line or in --config)")
        opts = cls(**out)
        opts.check_bounds()
        opts.validate()
        return opts

    def check_bounds(self) -> None:
        """Every numeric option (each value of a list option) within its field's bounds."""
        for f in dataclasses.fields(self):
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            given = getattr(self, f.name)
            for value in given if isinstance(given, list) else [given]:
                if value is None or isinstance(value, (bool, Enum)) or not isinstance(value, (int, float)):
                    continue
                flag = "--" + f.name.replace("_", "-")
                if lo is not None and value < lo:
                    raise ReplayKDError(f"{flag} must be at least {lo}, got {value}")
                if hi is not None and value > hi:
                    raise ReplayKDError(f"{flag} must be at most {hi}, got {value}")

    def validate(self) -> None:
        """Checks across options (a combination that cannot apply is an error that says why)."""

    def to_config(self) -> dict:
        """Every option as plain YAML values (what `--config` reads back). A list option of one value is written as
        that value, as before such options took several: a one-teacher run's config (and so its resume) is
        unchanged."""
        return {f.name: _config_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def defaults(self) -> dict:
        """Every option's default as the config holds it: what a run whose config.yaml predates an option ran with
        (each option added later defaults to the behaviour before it)."""
        return {f.name: _config_value(f.default) for f in dataclasses.fields(self)
                if f.default is not dataclasses.MISSING}

    def plan(self) -> dict:
        """The values of the options in PLAN."""
        config = self.to_config()
        return {k: config[k] for k in self.PLAN}


def _config_value(v):
    """An option's value as YAML holds it."""
    if isinstance(v, list):
        v = [str(x) if isinstance(x, Path) else x for x in v]
        return v[0] if len(v) == 1 else v
    return v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else public(v)


@dataclass
class ShardsOptions(Options):
    """Write SOURCE as shuffled WebDataset shards with a parquet manifest (images copied byte for byte)."""

    source: str = opt(help="'digits' (built-in handwritten digits, offline); an ImageFolder root: "
                           "ROOT/<class>/<image>, or ROOT/train/... and ROOT/val/...; or existing shards to "
                           "re-shuffle (e.g. class-sorted ones): a quoted glob 'DIR/*.tar' or a folder with a "
                           "replaykd manifest", argument=True)
    out: Path | str = opt(help="Folder for the shards ({split}-{index:06d}.tar) and the manifest, or an object-store "
                               "URL (s3://bucket/in1k: staged on local disk, then uploaded, the manifest last).",
                          argument=True)
    shard_size: int = opt(1000, "Samples per shard.", min=1)
    seed: int = opt(0, "Seed of the train/val split and of the shuffle across shards.", min=0)
    val_fraction: float = opt(0.2, "Fraction of each class held out as 'val' when the source has no val/ folder; "
                                   "0 for none.", min=0.0, max=0.99)
    skip_bad: bool = opt(False, "Skip images that fail to decode (or have more than --max-pixels) instead of stopping "
                                "(listed in OUT/skipped.txt).")
    max_pixels: int = max_pixels_opt()
    overwrite: bool = opt(False, "Replace shards and manifest already in OUT (only files this tool writes).")
    digits_size: int = opt(32, "Side in pixels of the PNGs written for the digits source.", min=8)
    storage_options: dict | None = opt(None, STORAGE_HELP)


@dataclass
class ManifestOptions(Options):
    """Build the manifest of shards that already exist, without rewriting them."""

    shard_glob: str = opt(help="Glob of existing WebDataset shards, quoted, e.g. 'data/in1k/train-*.tar' or "
                               "'imagenet-1k-wds/imagenet1k-*.tar' (splits from the names, prefix-SPLIT-NNNN.tar, or "
                               "from _info.json). Each sample needs an image field and an integer 'cls' (or 'label' "
                               "in its 'json').", argument=True)
    out: Path | str = opt(help="Folder (or object-store URL) for the manifest (parquet per split + manifest.json).",
                          argument=True)
    classes: Path | None = opt(None, "Text file with one class name per line (default: classes.txt beside the "
                                     "shards, else the label numbers).")
    num_classes: int | None = opt(None, "How many classes the labels index into, when no class names are given "
                                        "(default: the largest label + 1; ImageNet-1k: 1000).", min=1)
    overwrite: bool = opt(False, "Replace a manifest already in OUT.")
    decode_check: bool = opt(True, "Decode every image first, in parallel (one process per core), and refuse the "
                                   "shards naming each image that does not decode (stage one could never make its "
                                   "views); --no-decode-check skips it.")
    max_pixels: int = max_pixels_opt()
    storage_options: dict | None = opt(None, STORAGE_HELP)


@dataclass
class ViewsOptions(Options):
    """Write a PNG grid of replayed (mixed) views of a few samples across epochs."""

    data: Path = opt(help="Dataset folder holding manifest.json (as written by 'replaykd shards').", argument=True)
    recipe: str = opt("deit", "Recipe name under manifests/recipes/ or a YAML file.")
    epochs: str = opt("0-3", "Epochs to show, one column each: '0-3' or '0,2,5'.")
    samples: int = opt(8, "Samples to show, one row each (from the first shard).", min=1)
    seed: int = opt(0, "Run seed of the views.", min=0)
    split: str = opt("train", "Split to take samples from.")
    out: Path = opt(Path("views.png"), "PNG file to write.")
    cell: int = opt(96, "Side of each cell in pixels.", min=8)


@dataclass
class TrainTeacherOptions(Options):
    """Train a teacher on a data set's shards (soft-target cross-entropy to the recipe's mixed, smoothed labels): a
    small timm classifier from scratch, or a pretrained one fine-tuned on the data set's classes (--init)."""

    data: Path = opt(Path("data/digits"), "Dataset folder with manifest.json.")
    model: str = opt("regnety_002", "timm model name of a teacher trained from scratch (or the architecture of "
                                    "--init-checkpoint).")
    init: str | None = opt(None, "Fine-tune this pretrained timm teacher instead, by name with its tag (e.g. "
                                 "regnety_160.deit_in1k) or hf-hub:ORG/NAME[@REV], from the Hugging Face cache; its "
                                 "head is replaced where its class count differs from the data set's.")
    init_checkpoint: Path | None = opt(None, "Fine-tune the weights in this local file (a --model) instead.")
    recipe: str = opt("digits-teacher", "Training augmentation (recipe name or YAML file); a mixing recipe trains "
                                        "on the mixed views' mixed labels.")
    input_size: int | None = opt(None, "Side the teacher sees: views are resized to it (0: as made). Default: the "
                                       "pretrained teacher's own, else 32 (RegNet's stride 32 needs >= 32).", min=0)
    epochs: int = opt(30, "Training epochs.", min=1)
    batch_size: int = opt(64, "Batch size.", min=1)
    lr: float = opt(2e-3, "Peak AdamW learning rate.", min=0.0)
    weight_decay: float = opt(0.05, "AdamW weight decay.", min=0.0)
    warmup_epochs: int = opt(2, "Linear warm-up epochs before the cosine decay.", min=0)
    seed: int = opt(0, "Seed of the initialisation and of the views.", min=0)
    eval_split: str = opt("val", "Split to evaluate on each epoch ('validation' is used when the manifest has no "
                                 "'val'); 'none' to train without evaluation.")
    workers: int = workers_opt(2)
    prefetch: int = prefetch_opt()
    decode_memory: int = decode_memory_opt()
    threads: int | None = threads_opt()
    device: Device = opt(Device.auto, "Where to train: auto (a GPU when there is one), cpu or cuda.")
    out: Path = opt(Path("runs/teacher/teacher.safetensors"), "Where to write the weights (safetensors); a .json "
                    "beside it says how timm loads them (name, classes, preprocessing) and holds the accuracy, a "
                    ".yaml these options.")

    def validate(self) -> None:
        if self.init is not None and self.init_checkpoint is not None:
            raise ReplayKDError("--init (pretrained weights by name) and --init-checkpoint (weights in a local file "
                                "for --model) are two ways to start; give one")


@dataclass
class TeacherCacheOptions(Options):
    """Stage one: cache the teacher's top-k targets for every view of every epoch. Resumable; torchrun-parallel."""

    out: Path | str = opt(help="Zarr store to create, resume or grow: a folder, or an object-store URL "
                               "(s3://bucket/caches/in1k.zarr).")
    checkpoint: Path | None = opt(None, "Teacher weights in a local .pth or .safetensors file (plain, or wrapped in "
                                        "'model'/'state_dict'); default: --teacher's pretrained weights from the "
                                        "Hugging Face cache.")
    manifest: Path | str = opt(Path("data/digits"), "Dataset folder (or URL) with manifest.json (from 'replaykd "
                                                     "shards' or 'replaykd manifest').")
    shards: Path | str | None = opt(None, "Folder (or URL) of the shards, when not where the manifest says.")
    storage_options: dict | None = opt(None, STORAGE_HELP)
    split: str = opt("train", "Split to cache.")
    recipe: str = opt("deit", "Augmentation recipe: a name under manifests/recipes/ or a YAML file.")
    teacher: str = opt(DEIT_TEACHER, "The teacher: a timm name with its pretrained tag (DeiT's is "
                                     "regnety_160.deit_in1k; plain regnety_160 is timm's default tag, another "
                                     "model), hf-hub:ORG/NAME[@REV], or the architecture of --checkpoint.")
    teacher_input_size: int | None = opt(None, "Resize views to this side for the teacher (default: the teacher's "
                                               "own: its pretrained config, or the .json beside --checkpoint).", min=1)
    epochs: int = opt(300, "Epochs of views to cache (students can train this many epochs). A larger value grows "
                           "an existing store.", min=1)
    topk: int = opt(10, "Teacher probabilities kept per view (sorted, float16) with their class indices.", min=1)
    seed: int = opt(0, "Run seed: views depend on (seed, epoch, sample key) only.", min=0)
    batch_size: int = opt(256, "Views per teacher forward.", min=1)
    workers: int = workers_opt(4)
    prefetch: int = prefetch_opt()
    threads: int | None = threads_opt()
    device: Device = opt(Device.auto, "Where the teacher runs: auto, cpu or cuda (bf16 autocast and channels_last "
                                      "on GPU).")
    lease: float = opt(300.0, "Seconds a data shard's claim stays this process's without a renewal (renewed every "
                              "quarter of it): a process silent this long (a machine stalled or cut off) is taken "
                              "for gone and others build its shards. Claims only spread work: a unit is written "
                              "once, so a late writer never changes one.", min=1.0)
    decode_memory: int = decode_memory_opt()
    part: str | None = opt(None, "This launch's part of a job run as N independent launches, I/N (default: a Slurm "
                                 "job array's SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT, else 0/1). Each part "
                                 "(and each torchrun rank within it) deals itself a balanced share of what is left, "
                                 "then helps with the rest; a data shard is only ever built by one process.")
    json_out: bool = opt(False, "Print the summary as JSON.", flags=("--json",))


@dataclass
class CacheInfoOptions(Options):
    """Identity (teacher, manifest, recipe, seed), completeness and size of a store; given several stores, also
    whether they hold the same views (so train-student can combine them) and how often their teachers' top-1
    agree."""

    stores: list[Path | str] = opt(help="Teacher caches (Zarr stores): folders or URLs, one or more.", argument=True)
    units: int = opt(256, "With several stores: units (epoch, shard) of each pair read to compare their top-1, "
                          "spread evenly over the units both hold (0: every one).", min=0)
    storage_options: dict | None = opt(None, STORAGE_HELP)
    json_out: bool = opt(False, "Print JSON instead of text.", flags=("--json",))


@dataclass
class CacheVerifyOptions(Options):
    """Remake random views, check their fingerprints, re-run the teacher and compare targets; with --full, also read
    every stored byte and check its CRC-32C. Exit 1 on a mismatch or damage."""

    store: Path | str = opt(help="Teacher cache (Zarr store): a folder or URL.", argument=True)
    storage_options: dict | None = opt(None, STORAGE_HELP)
    samples: int = opt(64, "Random cached views to remake and re-run through the teacher (memory stays that of one "
                           "shard, whatever the number).", min=0)
    full: bool = opt(False, "Also read every unit and check its CRC-32C (all bytes of the store); damaged and "
                            "missing units are listed, and either exits 1.")
    threads: int = opt(16, "Units read at once by --full (object stores answer many requests at once).", min=1)
    data: Path | None = opt(None, "Dataset folder (default: the one recorded in the store).")
    checkpoint: Path | None = opt(None, "Teacher weights (default: the file, or the pretrained weights, recorded "
                                        "in the store; their sha256 must match).")
    atol: float = opt(5e-3, "Largest |stored - recomputed| probability accepted.", min=0.0)
    seed: int = opt(0, "Seed of the choice of views.", min=0)
    device: Device = opt(Device.auto, "Where the teacher runs: auto, cpu or cuda.")


@dataclass
class CacheRepairOptions(Options):
    """Drop a store's damaged units (every unit is read and its CRC-32C checked; a damaged unit's object is
    deleted), so the teacher-cache command that built the store, printed at the end, rebuilds them."""

    store: Path | str = opt(help="Teacher cache (Zarr store): a folder or URL.", argument=True)
    storage_options: dict | None = opt(None, STORAGE_HELP)
    threads: int = opt(16, "Units read at once.", min=1)


@dataclass
class CachePackOptions(Options):
    """Write a finished store into the packed layout: a Zarr shard file per data shard and a few epochs instead of
    an object per unit (fewer files, for shared file systems and publishing). The packed store is read like any
    other, is read-only, and proves every unit as the loose one does."""

    store: Path | str = opt(help="A complete loose teacher cache: a folder or URL.", argument=True)
    out: Path | str = opt(help="The packed store to write (must not exist; a packing that stopped is redone).",
                          argument=True)
    epochs_per_file: int = opt(8, "Epochs of one data shard per Zarr shard file (fewer, larger files).", min=1)
    threads: int = opt(16, "Units read at once.", min=1)
    storage_options: dict | None = opt(None, STORAGE_HELP)


@dataclass
class CacheUpgradeOptions(Options):
    """Rewrite a format 7 store, or unpack a packed one, into a loose store of this format without running the
    teacher: every intact unit is copied (and proved on the way); damaged ones are named and left missing, for the
    teacher-cache command to rebuild. Stopped, it continues where it was when run again."""

    store: Path | str = opt(help="The store to read: format 7, or packed.", argument=True)
    out: Path | str = opt(help="The loose store to write (new, or one this command started from the same store).",
                          argument=True)
    threads: int = opt(16, "Units copied at once.", min=1)
    storage_options: dict | None = opt(None, STORAGE_HELP)


@dataclass
class StudentOptions(Options):
    """Stage two: train a student (any timm classifier; a distilled DeiT keeps its two heads) on the replayed views,
    with the teacher's targets from the cache."""

    PLAN: ClassVar[tuple[str, ...]] = (
        "manifest", "split", "recipe", "seed", "init_seed", "epochs", "student", "img_size", "patch_size", "depth",
        "embed_dim", "num_heads", "batch_size", "lr", "weight_decay", "warmup_epochs", "min_lr", "drop_path",
        "distillation", "keep_distillation_token", "alpha", "tau", "soft_scale", "cache", "online_teacher",
        "cache_weights", "reuse_epochs", "clip_grad", "model_ema")
    # Loader options that decide which views share a batch: a resume that changed them would not reproduce the
    # uninterrupted run.
    BATCHING: ClassVar[tuple[str, ...]] = ("workers", "shuffle_buffer", "decode_memory")

    out: Path = opt(help="Run folder: config.yaml, log.jsonl, summary.csv, checkpoints, curves.png, summary.json.")
    manifest: Path | str = opt(Path("data/digits"), "Dataset folder (or URL) with manifest.json.")
    cache: list[Path | str] | None = opt(None, "Teacher cache from stage one, a folder or URL (its manifest, recipe, "
                                               "seed and split must match). Repeat it to distil from several "
                                               "teachers: the teacher is the weighted mean of the caches' "
                                               "distributions (each made dense from its top-k); the caches must hold "
                                               "the same views (manifest, split, recipe, seed, classes), their k, "
                                               "teachers and epochs may differ (the run uses the epochs all hold).")
    cache_weights: list[float] | None = opt(None, "Weight of each teacher in the mean, in the order of --cache (or "
                                                  "of --online-teacher), comma-separated, e.g. 0.5,0.5: one per "
                                                  "teacher, none negative, summing to 1 (default: equal).", min=0.0)
    storage_options: dict | None = opt(None, STORAGE_HELP)
    online_teacher: list[str] | None = opt(None, "Run this timm teacher in the loop instead of reading a cache "
                                                 "(DeiT's way; the baseline): a name with its tag, or "
                                                 "hf-hub:ORG/NAME[@REV]. Repeat it for an ensemble, as several "
                                                 "--cache would be (the same targets, view for view).")
    teacher_checkpoint: list[Path] | None = opt(None, "Weights of --online-teacher in a local file (default: its "
                                                      "pretrained weights from the Hugging Face cache); with several "
                                                      "online teachers, one per teacher, in order.")
    teacher_input_size: list[int] | None = opt(None, "Side the online teacher sees (default: its own); with several "
                                                     "online teachers, one per teacher, in order.", min=1)
    topk: list[int] | None = opt(None, "Top-k of the online teacher's targets, as a cache would store them (default "
                                       "10; only with --online-teacher: a cache fixes its own k); with several online "
                                       "teachers, one for all or one per teacher, in order.", min=1)
    split: str = opt("train", "Training split.")
    eval_split: str = opt("val", "Split to evaluate on after each epoch ('validation' is used when the manifest has "
                                 "no 'val'); 'none' to train without evaluation.")
    recipe: str = opt("deit", "Augmentation recipe (the cache's views: its crops, RandAugment, erasing, mixing and "
                              "repeats must match; label smoothing and the eval crop are the student's own).")
    seed: int = opt(0, "Run seed of the views (must be the cache's).", min=0)
    init_seed: int = opt(0, "Seed of the student's initialisation, drop path and batch order (each rank draws drop "
                            "path with init_seed + rank).", min=0)
    epochs: int = opt(300, "Training epochs (DeiT: 300).", min=1)
    reuse_epochs: bool = opt(False, "Allow more epochs than the cache holds by cycling the cached epochs.")
    student: str = opt("deit_tiny_distilled_patch16_224", "Any timm classifier. A distilled DeiT "
                       "(deit_tiny/small/base_distilled_patch16_224) learns with DeiT's two heads; any other model "
                       "with KD on its one head; with --distillation none a distilled DeiT becomes DeiT's baseline "
                       "without the distillation token.")
    img_size: int | None = opt(None, "Student input size (checked against the recipe's input_size, the size of the "
                                     "views).", min=1)
    patch_size: int | None = opt(None, "Patch size of a ViT student (default: the model's, 16).", min=1)
    depth: int | None = opt(None, "Override the number of blocks of a ViT student (small demo students).", min=1)
    embed_dim: int | None = opt(None, "Override the embedding width of a ViT student.", min=1)
    num_heads: int | None = opt(None, "Override the attention heads of a ViT student.", min=1)
    distillation: Distillation = opt(Distillation.hard, "hard (DeiT's: CE to the teacher's top-1), soft (KL at "
                                                        "--tau to the densified top-k) or none (labels only).")
    keep_distillation_token: bool = opt(False, "With --distillation none, train the distilled DeiT itself, both "
                                               "heads on the labels, instead of DeiT's baseline: the same model as a "
                                               "KD run, to compare like for like (what distillation alone changes).")
    alpha: float = opt(0.5, "Weight of the distillation term.", min=0.0, max=1.0)
    tau: float | None = opt(None, "Temperature of soft distillation (default 1.0; only with --distillation soft).",
                            min=1e-3)
    soft_scale: SoftScale = opt(SoftScale.deit, "What soft distillation's KL term (tau^2 x the KL summed over the "
                                "batch and the classes) is divided by; only --distillation soft uses it. deit: batch "
                                "x classes, as DeiT's losses.py (facebookresearch/deit); batchmean: the batch only, "
                                "as timm's distillation tasks (reduction='batchmean'), a term C times larger for C "
                                "classes against the same --alpha.")
    batch_size: int = opt(256, "Batch size per process (even for a mixing recipe: views come in pairs). Each rank "
                               "takes only full batches, as DeiT.", min=1)
    lr: float = opt(5e-4, "Base learning rate, scaled by batch_size * processes / 512 (DeiT).", min=0.0)
    weight_decay: float = opt(0.05, "AdamW weight decay (not on norms, biases, tokens).", min=0.0)
    warmup_epochs: int = opt(5, "Linear warm-up epochs.", min=0)
    min_lr: float = opt(1e-5, "Learning rate at the end of the cosine schedule.", min=0.0)
    drop_path: float = opt(0.1, "Stochastic depth rate.", min=0.0, max=1.0)
    clip_grad: float | None = opt(None, "Clip the gradient norm to this value (off by default).", min=0.0)
    model_ema: float | None = opt(None, "Keep an EMA of the weights with this decay (e.g. 0.99996), evaluate it and "
                                        "export it too.", min=0.0, max=1.0)
    check_fingerprints: FingerprintCheck = opt(FingerprintCheck.all, "Compare replayed views' fingerprints with the "
                                               "cache: all, sample (1 in 16) or off.")
    shuffle_buffer: int | None = opt(None, "Views shuffled through a buffer of this size in each loader worker "
                                           "(default: 1024, fewer where views are large: as many as fit in 32 MB; "
                                           "0: none).", min=0)
    decode_memory: int = decode_memory_opt()
    workers: int = workers_opt(4)
    prefetch: int = prefetch_opt()
    threads: int | None = threads_opt()
    device: Device = opt(Device.auto, "Where to train: auto, cpu or cuda (bf16 autocast and channels_last on GPU).")
    log_tensorboard: bool = opt(False, "Also log each epoch's figures to TensorBoard, in OUT/tensorboard (needs "
                                       "the tensorboard package: pip install 'replaykd[tensorboard]').")
    log_wandb: bool = opt(False, "Also log each epoch's figures to Weights & Biases (needs the wandb package: pip "
                                 "install 'replaykd[wandb]'; WANDB_MODE=offline works without a network).")
    wandb_project: str = opt("replaykd", "W&B project of --log-wandb.")
    log_interval: int = opt(10, "Read the loss every this many steps, for the progress bar and each epoch's "
                                "step_losses in log.jsonl (DeiT prints every 10).", min=1)
    resume: bool = opt(False, "Continue the run in OUT from its last finished epoch.")
    stop_after: int | None = opt(None, "Stop after this many finished epochs (continue later with --resume).", min=1)

    def validate(self) -> None:
        none = self.distillation is Distillation.none
        if none and (self.cache is not None or self.online_teacher is not None):
            given = "--cache" if self.cache is not None else "--online-teacher"
            raise ReplayKDError(f"--distillation none trains on labels only, so {given} would not be used; drop it "
                                "(or choose --distillation hard/soft)")
        if not none and (self.cache is None) == (self.online_teacher is None):
            raise ReplayKDError("give exactly one of --cache (stage two) and --online-teacher (teacher in the loop), "
                                "or --distillation none" + (": an ensemble's teachers are all cached or all online"
                                                            if self.cache is not None else ""))
        if self.online_teacher is None:
            for name in ("teacher_checkpoint", "teacher_input_size", "topk"):
                if getattr(self, name) is not None:
                    why = "the cache fixes the teacher and its k" if self.cache is not None else "there is no teacher"
                    raise ReplayKDError(f"--{name.replace('_', '-')} applies to --online-teacher only ({why})")
        else:
            n = len(self.online_teacher)
            for name, counts in (("teacher_checkpoint", (n,)), ("teacher_input_size", (n,)), ("topk", (1, n))):
                given = getattr(self, name)
                if given is not None and len(given) not in counts:
                    each = "one for all or one per teacher" if len(counts) > 1 else "one per teacher"
                    raise ReplayKDError(f"--{name.replace('_', '-')} has {len(given)} values for {n} online "
                                        f"teachers (--online-teacher): {each}, in order")
        self._check_weights()
        given = [str(Path(c).resolve()) if isinstance(c, Path) else str(c) for c in self.cache or []]
        twice = sorted({c for c in given if given.count(c) > 1})
        if twice:
            raise ReplayKDError(f"--cache {twice[0]} is given more than once: each --cache is one teacher of the "
                                "ensemble (to weigh a teacher more, use --cache-weights)")
        if self.keep_distillation_token and not none:
            raise ReplayKDError("--keep-distillation-token applies to --distillation none (a KD run keeps the token "
                                "already): drop it")
        if self.reuse_epochs and self.cache is None:
            raise ReplayKDError("--reuse-epochs cycles a cache's epochs; without --cache every epoch has its own "
                                "views already: drop it")
        if self.tau is not None and self.distillation is not Distillation.soft:
            raise ReplayKDError(f"--tau is the temperature of soft distillation; --distillation "
                                f"{self.distillation.value} does not use it: drop it (or use --distillation soft)")

    def _check_weights(self) -> None:
        """--cache-weights: one per teacher, none negative, summing to 1 (within 1e-6), and only with several."""
        w = self.cache_weights
        if w is None:
            return
        flag = "--cache" if self.cache is not None else "--online-teacher"
        teachers = self.cache or self.online_teacher or []
        shown = ",".join(f"{x:g}" for x in w)
        if len(teachers) < 2:
            raise ReplayKDError("--cache-weights weighs several teachers (--cache or --online-teacher given more than "
                                f"once); {'one ' + flag + ' has' if teachers else 'this run has'} nothing to weigh: "
                                "drop it")
        if len(w) != len(teachers):
            raise ReplayKDError(f"--cache-weights {shown} has {len(w)} values for {len(teachers)} teachers "
                                f"({flag} given {len(teachers)} times): one per teacher, in order")
        if abs(sum(w) - 1.0) > WEIGHT_TOLERANCE:
            raise ReplayKDError(f"--cache-weights {shown} sum to {sum(w):g}, not 1: the teacher is their weighted "
                                "mean")

    def teacher_weights(self) -> list[float]:
        """Each teacher's weight in the mean: --cache-weights, else equal."""
        n = len(self.cache or self.online_teacher or [])
        return list(self.cache_weights) if self.cache_weights is not None else [1.0 / n] * n


@dataclass
class EvaluateOptions(Options):
    """Top-1/top-5 of an exported student (each head of a distilled DeiT) on a split, without training: the model is
    loaded through timm as the JSON beside it says, with its own evaluation transform."""

    checkpoint: Path = opt(help="Exported weights (a run's checkpoint.safetensors or checkpoint-ema.safetensors, "
                                "with the .json beside them).")
    manifest: Path | str = opt(Path("data/digits"), "Dataset folder (or URL) with manifest.json.")
    storage_options: dict | None = opt(None, STORAGE_HELP)
    split: str = opt("val", "Split to evaluate ('validation' is used when the manifest has no 'val').")
    batch_size: int = opt(256, "Batch size.", min=1)
    workers: int = opt(2, "DataLoader worker processes.", min=0)
    device: Device = opt(Device.auto, "Where to evaluate: auto, cpu or cuda.")
    json_out: bool = opt(False, "Print JSON instead of text.", flags=("--json",))


@dataclass
class ReportOptions(Options):
    """Write RUN/report.md and RUN/report.json from the runs' own files (and a README section, if asked)."""

    run: Path = opt(Path("runs/demo"), "Demo run folder (teacher/, cache.zarr, student-*/).", argument=True)
    readme: Path | None = opt(None, "Also rewrite this README's demo section (between its demo:start/end markers).")


@dataclass
class StudyReportOptions(Options):
    """Write RUN/report.md and RUN/report.json: mean and spread of each arm's accuracy over its seeds, each teacher's
    own accuracy, the KD gain and an ensemble's gain over its best teacher alone."""

    run: Path = opt(Path("runs/study"), "Study folder: one student run per (arm, seed), e.g. hard-seed0/, none-seed0/; "
                                        "runs fall into arms by how they were taught (their summary.json's source, "
                                        "distillation and teachers with their weights).", argument=True)


@dataclass
class BenchOptions(Options):
    """Measure replay vs timm, stage one vs the bare teacher, stage two with/without KD, and cache size."""

    out: Path = opt(Path("runs/bench"), "Folder for bench.json, bench.md and the bench's own data.")
    preset: str | None = opt(None, "'small' (digits sizes; the default on CPU), 'imagenet' (DeiT-Ti/S/B at 224 with "
                                   "regnety_160; the default on GPU) or 'smoke' (small on digits alone, one epoch: "
                                   "checks that the bench runs).")
    repeats: int = opt(3, "Interleaved repetitions of each measurement (the median is reported).", min=1)
    views: int = opt(512, "Images per replay measurement, and synthetic images for the imagenet preset.", min=8)
    epochs: int | None = opt(None, "Epochs of each stage-two run and of the stage-one store (default: the preset's).",
                             min=1)
    workers: int = opt(2, "DataLoader workers for the stage measurements.", min=0)
    device: Device = opt(Device.auto, "Where to measure: auto, cpu or cuda.")
    real_cache: Path | None = opt(Path("runs/demo/cache.zarr"), "A cache of real teacher outputs whose stored bytes "
                                                               "per view to report (the demo's; skipped if absent).")
    pillow_simd: Path | None = opt(Path(".pillow-simd"), "A folder with pillow-simd installed (pip install --target; "
                                   "'make pillow-simd' builds it) to measure the loader with it too (skipped if absent).")
    readme: Path | None = opt(None, "Also rewrite this README's bench section (between its bench:start/end markers).")
    render_only: bool = opt(False, "Measure nothing: rewrite bench.md (and --readme) from OUT/bench.json.")

    def validate(self) -> None:
        if self.preset is not None and self.preset not in ("small", "imagenet", "smoke"):
            raise ReplayKDError(f"--preset must be small, imagenet or smoke, got {self.preset!r}")


@dataclass
class ScaleBenchOptions(Options):
    """ImageNet's shape on this machine: a synthetic ImageNet-1k-shaped data set (tiny JPEGs) and a 300-epoch store,
    the commands users run timed in fresh processes, an ImageNet-21k-shaped manifest through the plan and the store
    layout, and loader workers' private memory at 224 px; into OUT/scale.json and scale.md."""

    out: Path = opt(Path("runs/bench"), "Folder for scale.json and scale.md; the data (about 3 GB) goes under "
                                        "OUT/scale/ and is reused by later runs.")
    window: float = opt(60.0, "Seconds each stage runs after its start-up before it is stopped (its rate is "
                              "measured over this window, not a full epoch).", min=5.0)
    workers: int = opt(2, "Loader workers of the timed commands.", min=1)
    recipe: str = opt("digits", "Recipe of the timed commands (the data's images are 16 px).")
    verify_epochs: int = opt(4, "Epochs of synthetic units (1,282 each, DeiT's recipe) that `cache verify --full` "
                                "reads for its rate, locally and on a local S3 server.", min=1, max=300)
    readme: Path | None = opt(None, "Also rewrite this README's scale section (between its scale:start/end markers).")
    render_only: bool = opt(False, "Measure nothing: rewrite scale.md (and --readme) from OUT/scale.json.")
