# replaykd: every target creates the virtual environment it needs (re-installed when pyproject.toml changes).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RKD    := $(VENV)/bin/replaykd
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1

# Demo data set (override on the command line, e.g. make shards SOURCE=/data/imagenet DATA=data/in1k).
SOURCE     ?= digits
DATA       ?= data/digits
SHARD_SIZE ?= 200

.PHONY: venv test shards demo clean

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

demo: shards

clean:
	rm -rf data runs
