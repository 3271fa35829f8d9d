# replaykd: every target creates the virtual environment it needs (re-installed when pyproject.toml changes).
# Defaults run the digits demo on the CPU; override any variable on the command line, e.g.
#   make teacher-cache DATA=data/in1k RECIPE=deit TEACHER=regnety_160 TEACHER_CKPT=w/regnety_160.pth EPOCHS=300
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RKD    := $(VENV)/bin/replaykd
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1

SOURCE         ?= digits
DATA           ?= data/digits
SHARD_SIZE     ?= 200
RUN            ?= runs/demo
RECIPE         ?= digits
TEACHER        ?= regnety_002
TEACHER_CKPT   ?= $(RUN)/teacher/teacher.safetensors
TEACHER_EPOCHS ?= 8
# The demo teacher from scratch: AdamW at 1e-2 after 1 warm-up epoch reaches 90-93% on val in its 8 epochs (seeds
# 0-2); train-teacher's defaults (2e-3, 2 warm-up epochs, made for fine-tuning too) left it at 79-82%, a teacher too
# weak for the demo's KD gain to stand clear of the noise on 359 images (measured 2026-12-06).
TEACHER_LR     ?= 1e-2
TEACHER_WARMUP ?= 1
EPOCHS         ?= 55
TOPK           ?= 10
SEED           ?= 0
STORE          ?= $(RUN)/cache.zarr
WORKERS        ?= 2
BATCH          ?= 256
DEVICE         ?= auto
NPROC          ?= 1
STUDENT        ?= deit_tiny_distilled_patch16_224
# The demo student: DeiT-Ti's width at 16 px, patch 4, 4 blocks of width 96 (with 8 teacher epochs and 55 student epochs, what `make demo` fits in about 8 minutes on 2 cores).
STUDENT_ARGS   ?= --patch-size 4 --depth 4 --embed-dim 96 --num-heads 3
STUDENT_BATCH  ?= 64
LR             ?= 4e-3
DISTILLATION   ?= hard
STUDENT_RUN    ?= $(RUN)/student-$(DISTILLATION)
# make study-ensemble: a second teacher of another architecture (TEACHER_B, trained as the demo's teacher is, for
# TEACHER_EPOCHS), its cache STORE_B over the demo's views (the same DATA, RECIPE, SEED and EPOCHS as STORE), and the
# students of STORE, STORE_B and both, SEEDS initialisation seeds each, in ENSEMBLE_STUDY.
ENSEMBLE_STUDY ?= runs/study-ensemble
TEACHER_B      ?= resnet10t
TEACHER_B_CKPT ?= $(ENSEMBLE_STUDY)/teacher-b/teacher.safetensors
STORE_B        ?= $(ENSEMBLE_STUDY)/cache-b.zarr
LAUNCH         := $(if $(filter 1,$(NPROC)),$(RKD),$(PY) -m torch.distributed.run --nproc_per_node $(NPROC) -m replaykd)

.PHONY: venv test test-fast docs shards train-teacher teacher-cache train-student demo-start demo demo-hard demo-online demo-none study teacher-cache-b study-ensemble bench bench-scale pillow-simd readme clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,docs]'
	touch $(STAMP)

venv: $(STAMP)

# The tests in as many processes as there are cores (at most 4; pytest-xdist): most of them start processes or
# wait on them, so two at once on 2 cores take half the time of one after the other.
TEST_JOBS ?= auto --maxprocesses 4

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) -m "not slow"

# The documentation (docs/ and the API reference from the docstrings) into site/, offline; a warning fails it.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

$(DATA)/manifest.json: | $(STAMP)
	$(RKD) shards $(SOURCE) $(DATA) --shard-size $(SHARD_SIZE) --overwrite

shards: $(DATA)/manifest.json

$(RUN)/teacher/teacher.safetensors: $(DATA)/manifest.json
	$(RKD) train-teacher --data $(DATA) --model $(TEACHER) --epochs $(TEACHER_EPOCHS) --seed $(SEED) \
		--lr $(TEACHER_LR) --warmup-epochs $(TEACHER_WARMUP) --workers $(WORKERS) --device $(DEVICE) --out $@

train-teacher: $(RUN)/teacher/teacher.safetensors

teacher-cache: $(DATA)/manifest.json $(TEACHER_CKPT)
	$(LAUNCH) teacher-cache --manifest $(DATA) --recipe $(RECIPE) --teacher $(TEACHER) --checkpoint $(TEACHER_CKPT) \
		--epochs $(EPOCHS) --topk $(TOPK) --seed $(SEED) --batch-size $(BATCH) --workers $(WORKERS) \
		--device $(DEVICE) --out $(STORE)

train-student: teacher-cache
	test -f $(STUDENT_RUN)/summary.json || $(LAUNCH) train-student --manifest $(DATA) --cache $(STORE) --recipe $(RECIPE) --seed $(SEED) --epochs $(EPOCHS) \
		--student $(STUDENT) $(STUDENT_ARGS) --distillation $(DISTILLATION) --batch-size $(STUDENT_BATCH) --lr $(LR) \
		--workers $(WORKERS) --device $(DEVICE) --out $(STUDENT_RUN) $(if $(wildcard $(STUDENT_RUN)/train_state.pt),--resume,)

HARD_RUN   := $(RUN)/student-hard
ONLINE_RUN := $(RUN)/student-online
NONE_RUN   := $(RUN)/student-none
STUDENT_COMMON = --manifest $(DATA) --recipe $(RECIPE) --seed $(SEED) --epochs $(EPOCHS) --student $(STUDENT) \
	$(STUDENT_ARGS) --batch-size $(STUDENT_BATCH) --lr $(LR) --workers $(WORKERS) --device $(DEVICE)
# The demo's students run side by side on one compute thread each: a student's numbers follow its thread count, and
# cached == online holds bit for bit only at equal counts (a run's default share would change as the others end).
DEMO_THREADS ?= 1

# The whole pipeline on digits: shards -> teacher -> cache -> three students on the same views -> report, as a graph
# run with make -j3 after the teacher (alone on all cores: beside a student it took 2-3x as long, 2026-12-06): the
# labels-only student trains beside the cache build, the two KD students beside each other. The
# report's demo_seconds run from demo-start (this invocation's first step once the virtual environment is installed)
# to the report.
demo-start: $(STAMP)
	mkdir -p $(RUN) && date +%s.%N > $(RUN)/demo-start

demo: demo-start
	$(MAKE) $(TEACHER_CKPT)
	$(MAKE) -j3 demo-hard demo-online demo-none
	$(RKD) views $(DATA) --recipe $(RECIPE) --epochs 0-5 --out $(RUN)/views.png
	$(RKD) report $(RUN)

demo-hard: teacher-cache
	test -f $(HARD_RUN)/summary.json || $(RKD) train-student $(STUDENT_COMMON) --cache $(STORE) --distillation hard \
		--threads $(DEMO_THREADS) --out $(HARD_RUN) $(if $(wildcard $(HARD_RUN)/train_state.pt),--resume,)

demo-online: teacher-cache
	test -f $(ONLINE_RUN)/summary.json || $(RKD) train-student $(STUDENT_COMMON) --online-teacher $(TEACHER) \
		--teacher-checkpoint $(TEACHER_CKPT) --threads $(DEMO_THREADS) --out $(ONLINE_RUN) \
		$(if $(wildcard $(ONLINE_RUN)/train_state.pt),--resume,)

demo-none: shards
	test -f $(NONE_RUN)/summary.json || $(RKD) train-student $(STUDENT_COMMON) --distillation none \
		--threads $(DEMO_THREADS) --out $(NONE_RUN) $(if $(wildcard $(NONE_RUN)/train_state.pt),--resume,)

# DeiT's claim on real data, with error bars: the demo student with cached hard KD and with no KD, SEEDS
# initialisation seeds each, on the demo's views and cache; mean +- std into $(STUDY)/report.md. Not in CI.
STUDY ?= runs/study
SEEDS ?= 0 1 2
study: teacher-cache
	for s in $(SEEDS); do for arm in hard none; do out=$(STUDY)/$$arm-seed$$s; \
		test -f $$out/summary.json && continue; \
		src=$$( [ $$arm = hard ] && echo "--cache $(STORE)" || echo "--distillation none" ); \
		res=$$( [ -f $$out/train_state.pt ] && echo --resume ); \
		$(RKD) train-student $(STUDENT_COMMON) $$src --init-seed $$s --out $$out $$res || exit 1; \
	done; done
	$(RKD) study-report $(STUDY)

# Several teachers, one set of views (issue 26): is an ensemble of two caches a better teacher than either alone?
# The demo student from STORE alone, STORE_B alone and both (equal weights), each arm with SEEDS initialisation
# seeds, two runs at a time on DEMO_THREADS compute threads each; finished runs are skipped and a stopped one resumed.
# Each teacher's top-1, mean +- std per arm and the ensemble's gain into $(ENSEMBLE_STUDY)/report.md. Not in CI.
$(TEACHER_B_CKPT): $(DATA)/manifest.json
	$(RKD) train-teacher --data $(DATA) --model $(TEACHER_B) --epochs $(TEACHER_EPOCHS) --seed $(SEED) \
		--lr $(TEACHER_LR) --warmup-epochs $(TEACHER_WARMUP) --workers $(WORKERS) --device $(DEVICE) --out $@

teacher-cache-b: $(DATA)/manifest.json $(TEACHER_B_CKPT)
	$(LAUNCH) teacher-cache --manifest $(DATA) --recipe $(RECIPE) --teacher $(TEACHER_B) \
		--checkpoint $(TEACHER_B_CKPT) --epochs $(EPOCHS) --topk $(TOPK) --seed $(SEED) --batch-size $(BATCH) \
		--workers $(WORKERS) --device $(DEVICE) --out $(STORE_B)

ARM_a  = --cache $(STORE)
ARM_b  = --cache $(STORE_B)
ARM_ab = --cache $(STORE) --cache $(STORE_B)
ENSEMBLE_RUNS := $(foreach s,$(SEEDS),$(foreach arm,a b ab,$(ENSEMBLE_STUDY)/$(arm)-seed$(s)/summary.json))

study-ensemble: teacher-cache teacher-cache-b
	$(MAKE) -j2 $(ENSEMBLE_RUNS)
	$(RKD) study-report $(ENSEMBLE_STUDY)

# One run of the study, ARM-seedN: its arm's caches and its initialisation seed from the folder's name.
$(ENSEMBLE_STUDY)/%/summary.json:
	$(RKD) train-student $(STUDENT_COMMON) $(ARM_$(firstword $(subst -seed, ,$*))) \
		--init-seed $(lastword $(subst -seed, ,$*)) --threads $(DEMO_THREADS) --out $(@D) \
		$(if $(wildcard $(@D)/train_state.pt),--resume,)

# An accelerated Pillow build, installed beside the environment (not into it) so the bench can measure what it
# buys; to train with it, replace Pillow in the environment (see README) and rebuild caches (it changes pixels).
PILLOW_SIMD ?= .pillow-simd
SIMD_CC     := cc $(if $(shell grep -m1 -o avx2 /proc/cpuinfo 2>/dev/null),-mavx2,)
$(PILLOW_SIMD)/PIL/__init__.py: | $(STAMP)
	CC="$(SIMD_CC)" $(PY) -m pip install -q --no-deps --target $(PILLOW_SIMD) "pillow-simd>=12,<13"

pillow-simd: $(PILLOW_SIMD)/PIL/__init__.py

bench: $(STAMP)
	$(MAKE) pillow-simd || echo "pillow-simd could not be built: the loader is measured with stock Pillow only"
	$(RKD) bench --out runs/bench --device $(DEVICE) --workers $(WORKERS) --pillow-simd $(PILLOW_SIMD) \
		--real-cache $(STORE)

# ImageNet's shape on this machine (not in CI; about 3 GB of data under runs/bench/scale, kept for later runs).
bench-scale: $(STAMP)
	$(RKD) bench-scale --out runs/bench --workers $(WORKERS)

# The README's results sections, from the last `make demo`, `make bench` and `make bench-scale` (a run never edits
# tracked files).
readme: $(STAMP)
	$(RKD) report $(RUN) --readme README.md
	$(RKD) bench --out runs/bench --render-only --readme README.md
	test ! -f runs/bench/scale.json || $(RKD) bench-scale --out runs/bench --render-only --readme README.md

clean:
	rm -rf data runs site $(PILLOW_SIMD)
