# vqgen: `make demo` runs the whole pipeline on Fashion-MNIST; `make test` runs the tests.
# Both set everything up first (a virtual environment in .venv with the CPU build of torch).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs
CODES ?= codes/fashion_mnist
STAGE1_CKPT := $(RUNS)/stage1/latest/checkpoints/last.ckpt
PRIOR_CKPT := $(RUNS)/stage2_transformer/latest/checkpoints/best.ckpt
export WANDB_SILENT ?= true

.PHONY: setup setup-dev data data-emoji demo demo-emoji demo-stage1 test lint clean serve serve-emoji

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

# torch first, pinned: that pin is a local CPU build here; an unpinned torch would pull a multi-GB CUDA build.
# The commands need the project alone; the tests and lint add the dev tools (pytest, ruff, selenium, scipy:
# 10 s of the 45-s set-up here), so `make demo` does not wait for them.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST: Debian's package when apt is there (offline machines), else the loader downloads it.
data:
	@if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
		|| echo "could not apt-get dataset-fashion-mnist; the loader will try to download Fashion-MNIST"; fi

# Emoji (colour, 64 px): the npm packages emoji-datasource-{apple,google,twitter,facebook}@16.0.0 into data/emoji
# (checked against pinned SHA-256s; nothing is done when they are already there).
data-emoji: setup
	$(BIN)/python -m common.emoji data/emoji

demo-stage1: setup data
	$(BIN)/train_stage1 fit --config configs/stage1/fashion_mnist.yaml --trainer.default_root_dir $(RUNS)/stage1

demo: demo-stage1
	$(BIN)/extract_codes --ckpt $(STAGE1_CKPT) --out $(CODES) --overwrite
	$(BIN)/train_stage2 fit --config configs/stage2/fashion_mnist_transformer.yaml --data.codes_dir $(CODES) \
		--trainer.default_root_dir $(RUNS)/stage2_transformer
	$(BIN)/sample --prior $(PRIOR_CKPT) --n 64 --cfg_scale 4 --temperature 1.0 --temperature_end 1.4 --out $(RUNS)/samples.png --overwrite
	@echo "demo done: $(RUNS)/stage1/latest/reconstructions.png and $(RUNS)/samples.png"

# The whole pipeline on emoji (colour): at EMOJI_SIZE=32 (the default) 8x8 codes of 32-px
# glyphs, which a 5-minute CPU prior learns well enough to draw recognisable flags, faces and food (the
# classifier names the class drawn for 73-75 % of samples, 44-48 % at 64 px), in about 9 minutes on a quiet
# 2-core CPU; EMOJI_SIZE=64 is the earlier demo (16x16 codes of 64-px glyphs, 13-15 minutes, blobs of
# colour on a CPU). README, Colour and levels.
# EMOJI_PRIOR_TIME: the prior's training time (dd:hh:mm:ss; the cosine follows it); EMOJI_PRIOR_ARGS: more
# train_stage2 options, e.g. "--model.dropout 0.1" for a longer prior (README).
EMOJI_SIZE ?= 32
EMOJI_RUNS ?= $(RUNS)/emoji
EMOJI_CODES ?= codes/emoji_$(EMOJI_SIZE)px
EMOJI_PRIOR_TIME ?= 00:00:05:00
EMOJI_PRIOR_ARGS ?=
# The prior's batch in code maps: 16 of 256 codes at 64 px (the config's), 64 of 64 codes at 32 px (as many codes a step)
EMOJI_PRIOR_BATCH ?= $(if $(filter 64,$(EMOJI_SIZE)),16,64)
# Sampling: at 32 px guidance 3 (linear) was best on validation FID (README); the 64-px demo's temperature alone
EMOJI_SAMPLE_ARGS ?= $(if $(filter 64,$(EMOJI_SIZE)),,--cfg_scale 3 )--temperature 0.95
demo-emoji: data-emoji
	$(BIN)/train_stage1 fit --config configs/stage1/emoji.yaml --data.image_size $(EMOJI_SIZE) \
		--trainer.default_root_dir $(EMOJI_RUNS)/stage1
	$(BIN)/extract_codes --ckpt $(EMOJI_RUNS)/stage1/latest/checkpoints/last.ckpt --out $(EMOJI_CODES) --overwrite
	$(BIN)/train_stage2 fit --config configs/stage2/emoji_transformer.yaml --data.codes_dir $(EMOJI_CODES) \
		--data.batch_size $(EMOJI_PRIOR_BATCH) --trainer.max_time $(EMOJI_PRIOR_TIME) \
		--trainer.default_root_dir $(EMOJI_RUNS)/stage2_transformer $(EMOJI_PRIOR_ARGS)
	$(BIN)/sample --prior $(EMOJI_RUNS)/stage2_transformer/latest/checkpoints/best.ckpt --n 64 $(EMOJI_SAMPLE_ARGS) \
		--out $(EMOJI_RUNS)/samples.png --overwrite
	@echo "emoji demo done: $(EMOJI_RUNS)/stage1/latest/reconstructions.png and $(EMOJI_RUNS)/samples.png"

# The page: sample, repair, compress and score with the demo's models at http://127.0.0.1:7860/ (Ctrl-C stops);
# the Sample tab starts at the demo grid's guidance and temperature schedule.
serve: setup
	$(BIN)/serve --prior $(PRIOR_CKPT) --cfg_scale 4 --temperature 1.0 --temperature_end 1.4

# The same page with `make demo-emoji`'s models, sampling as its grid does.
serve-emoji: setup
	$(BIN)/serve --prior $(EMOJI_RUNS)/stage2_transformer/latest/checkpoints/best.ckpt $(EMOJI_SAMPLE_ARGS)

test: setup-dev
	$(BIN)/python -m pytest -q

lint: setup-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(RUNS) codes wandb
