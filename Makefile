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
TEACHER_EPOCHS ?= 30
EPOCHS         ?= 60
TOPK           ?= 10
SEED           ?= 0
STORE          ?= $(RUN)/cache.zarr
WORKERS        ?= 2
BATCH          ?= 256
DEVICE         ?= auto
NPROC          ?= 1
LAUNCH         := $(if $(filter 1,$(NPROC)),$(RKD),$(PY) -m torch.distributed.run --nproc_per_node $(NPROC) -m stages)

.PHONY: venv test shards train-teacher teacher-cache demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

$(DATA)/manifest.json: | $(STAMP)
	$(RKD) shards $(SOURCE) $(DATA) --shard-size $(SHARD_SIZE) --overwrite

shards: $(DATA)/manifest.json

$(RUN)/teacher/teacher.safetensors: $(DATA)/manifest.json
	$(RKD) train-teacher --data $(DATA) --model $(TEACHER) --epochs $(TEACHER_EPOCHS) --seed $(SEED) \
		--workers $(WORKERS) --device $(DEVICE) --out $@

train-teacher: $(RUN)/teacher/teacher.safetensors

teacher-cache: $(DATA)/manifest.json $(TEACHER_CKPT)
	$(LAUNCH) teacher-cache --manifest $(DATA) --recipe $(RECIPE) --teacher $(TEACHER) --checkpoint $(TEACHER_CKPT) \
		--epochs $(EPOCHS) --topk $(TOPK) --seed $(SEED) --batch-size $(BATCH) --workers $(WORKERS) \
		--device $(DEVICE) --out $(STORE)

demo: teacher-cache

bench: $(STAMP)
	$(RKD) bench --out runs/bench

clean:
	rm -rf data runs
