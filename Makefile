# The README's two commands: `make demo` (the main job) and `make test` (everything CI runs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed
EXT    := $(VENV)/.ext-built
CARGO_TEST_FLAGS ?= --release --workspace --exclude logitless-py
TRL_LEGACY     := 0.19.1 0.24.0 1.5.1 1.14.2
TRL_FIRST_HEAD := 1.15.0
TRL_DISTILL_CHUNKED := 1.14.2
TRL_ODDS_OLD   := 0.24.0
TRL_TPO_OLD    := 1.5.1
TRL_LEGACY_DIR := .trl-legacy
TORCHAO        := 0.18.0
TORCHAO_DIR    := .torchao

.PHONY: demo test test-rust test-python test-transformers4 build bench lint fmt clean

demo: build
	$(PY) -m logitless demo

test: lint test-rust test-python

# The ISA test runs again with its output shown: CI's log says which kernel paths this CPU ran (it fails when
# /proc/cpuinfo lists a level that did not run).
test-rust:
	cargo test $(CARGO_TEST_FLAGS)
	cargo test -q --release -p logitless-kernel --test isa_paths -- --nocapture

# tests/test_trl.py runs twice: on the pinned TRL, and on TRL_FIRST_HEAD (the first release whose trainers install
# their own fused head, so the drop-in's oldest caller) with that release's source first on PYTHONPATH.
# tests/test_trl_distillation.py also runs on TRL_FIRST_HEAD and on TRL_DISTILL_CHUNKED (DistillationTrainer's
# divergence with TRL's own chunk size in its signature: the other drop-in); tests/test_trl_gkd.py on both too
# (GKDTrainer's loss code is the same from 1.14 to the pinned release: the wrapper is checked on each).
# tests/test_trl_odds.py also runs on TRL_ODDS_OLD: ORPO's and CPO's methods there are the other release logitless
# reproduces (trl.trainer, label_pad_token_id configurable). tests/test_trl_tpo.py also runs on TRL_TPO_OLD
# (TPOTrainer's _compute_loss before TRL's fused entropy: the other release logitless reproduces).
test-python: build $(TRL_LEGACY_DIR)/.fetched $(TORCHAO_DIR)/.fetched
	$(PY) -m pytest -q
	PYTHONPATH=$(TRL_LEGACY_DIR)/trl-$(TRL_FIRST_HEAD) $(PY) -c \
	  'import sys, trl; v = trl.__version__; sys.exit(None if v == "$(TRL_FIRST_HEAD)" else f"TRL {v} on the path")'
	PYTHONPATH=$(TRL_LEGACY_DIR)/trl-$(TRL_FIRST_HEAD) $(PY) -m pytest -q -p no:cacheprovider tests/test_trl.py \
	  tests/test_trl_distillation.py tests/test_trl_gkd.py
	PYTHONPATH=$(TRL_LEGACY_DIR)/trl-$(TRL_DISTILL_CHUNKED) $(PY) -c \
	  'import sys, trl; v = trl.__version__; sys.exit(None if v == "$(TRL_DISTILL_CHUNKED)" else f"TRL {v} on the path")'
	PYTHONPATH=$(TRL_LEGACY_DIR)/trl-$(TRL_DISTILL_CHUNKED) $(PY) -m pytest -q -p no:cacheprovider \
	  tests/test_trl_distillation.py tests/test_trl_gkd.py
	PYTHONPATH=$(TRL_LEGACY_DIR)/trl-$(TRL_ODDS_OLD) $(PY) -c \
	  'import sys, trl; v = trl.__version__; sys.exit(None if v == "$(TRL_ODDS_OLD)" else f"TRL {v} on the path")'
	PYTHONPATH=$(TRL_LEGACY_DIR)/trl-$(TRL_ODDS_OLD) $(PY) -m pytest -q -p no:cacheprovider tests/test_trl_odds.py
	PYTHONPATH=$(TRL_LEGACY_DIR)/trl-$(TRL_TPO_OLD) $(PY) -c \
	  'import sys, trl; v = trl.__version__; sys.exit(None if v == "$(TRL_TPO_OLD)" else f"TRL {v} on the path")'
	PYTHONPATH=$(TRL_LEGACY_DIR)/trl-$(TRL_TPO_OLD) $(PY) -m pytest -q -p no:cacheprovider tests/test_trl_tpo.py

# Older TRL releases, their source only (unpacked wheels, not installed), for tests/test_trl_legacy.py: SFTTrainer
# before TRL 1.15, run with the source first on PYTHONPATH (versions: TRL_LEGACY, above); and TRL_FIRST_HEAD.
$(TRL_LEGACY_DIR)/.fetched: Makefile $(STAMP)
	rm -rf $(TRL_LEGACY_DIR)
	for v in $(TRL_LEGACY) $(TRL_FIRST_HEAD); do \
	  $(PY) -m pip download -q --no-deps "trl==$$v" -d $(TRL_LEGACY_DIR)/wheels && \
	  $(PY) -m zipfile -e $(TRL_LEGACY_DIR)/wheels/trl-$$v-py3-none-any.whl $(TRL_LEGACY_DIR)/trl-$$v || exit 1; \
	done
	touch $@

# torchao unpacked, not installed (on this torch it warns on every transformers import), for tests/test_hardening.py:
# a head quantised by torchao's quantize_, run in a child process with it on PYTHONPATH.
$(TORCHAO_DIR)/.fetched: Makefile $(STAMP)
	rm -rf $(TORCHAO_DIR)
	$(PY) -m pip download -q --no-deps "torchao==$(TORCHAO)" -d $(TORCHAO_DIR)/wheels
	$(PY) -m zipfile -e $(TORCHAO_DIR)/wheels/torchao-$(TORCHAO)-*.whl $(TORCHAO_DIR)/site
	touch $@

# transformers 4.57.6 on torch 2.6 (the oldest supported) in .venv-tf4: audit + verify (its forwards slice with
# `slice_indices`).
test-transformers4:
	bash .ci/transformers4.sh

# The wheel ships logitless_autoinstall.pth at its root (LOGITLESS=1 alone patches transformers); an editable
# `maturin develop` install does not, so it is copied beside the editable install's own .pth.
build: $(STAMP)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release -q
	cp python/logitless_autoinstall.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/"

$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements-dev.txt
	touch $@

bench: build
	$(PY) bench/compare.py

# The kernel also lints for aarch64 (wheels must build there; its SIMD engines compile out). The pure-Rust kernel
# needs no cross C compiler, but the target's std does: where rustup cannot fetch it, the check says so and skips.
lint:
	cargo fmt --all --check
	cargo clippy -q --release --workspace --all-targets -- -D warnings
	if rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1; then \
	  cargo clippy -q --release -p logitless-kernel --target aarch64-unknown-linux-gnu -- -D warnings; \
	else echo "lint: no aarch64 std from rustup; the kernel's aarch64 lint skipped"; fi

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf $(VENV) $(TRL_LEGACY_DIR) $(TORCHAO_DIR)
