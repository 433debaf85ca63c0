#!/usr/bin/env bash
# Second CI leg: the newest transformers 4.x (whose forwards slice with `slice_indices`) on the oldest supported
# torch (2.6: logitless._versions.MIN_TORCH), in its own venv.
# Runs the audit and the verified-coverage check there; exits non-zero on any mismatch or a verified count below
# the floor.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LOGITLESS_TF4_VENV:-.venv-tf4}"
TORCH="${LOGITLESS_TF4_TORCH:-torch==2.6.0}"
TRANSFORMERS="${LOGITLESS_TF4_TRANSFORMERS:-transformers==4.57.6}"
# Committed floor for this leg (177 were verified when it was last raised), no mismatch.
MIN_TOTAL="${LOGITLESS_TF4_MIN_VERIFIED:-172}"

test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH" "$TRANSFORMERS" "maturin>=1.8,<2" pytest \
    "${LOGITLESS_TF4_ACCELERATE:-accelerate==1.15.0}" "${LOGITLESS_TF4_PEFT:-peft==0.21.2}" \
    datasets "huggingface-hub>=0.34,<1.0"  # datasets for the older TRL releases; hub < 1.0 as transformers 4.x asks
VIRTUAL_ENV="$(cd "$VENV" && pwd)" "$VENV/bin/maturin" develop --release -q  # LOGITLESS_TF4_VENV may be absolute
"$VENV/bin/python" -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
"$VENV/bin/python" -m logitless audit >/dev/null
"$VENV/bin/python" -m logitless verify --quiet --min-total "$MIN_TOTAL" \
    --json "${LOGITLESS_TF4_JSON:-/tmp/logitless-verify-tf4.json}" --markdown docs/coverage-transformers4.md
# What differs between 4.x and 5.x beyond the forwards: the Trainer's label smoother (no num_items_in_batch in 4.x)
# and how remote code is loaded; and TRL before 1.15 on the transformers its users mostly ran it with (the releases'
# source is unpacked by `make test`, or here when this leg runs alone).
test -f .trl-legacy/.fetched || make -s .trl-legacy/.fetched
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_hf_trainer.py tests/test_remote_code.py \
    tests/test_trl_legacy.py
# ORPO and CPO of TRL 0.24 (trl.trainer, the other release logitless reproduces) on that transformers, run in this
# process with its source first on the path.
PYTHONPATH=.trl-legacy/trl-0.24.0 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_trl_odds.py
# TPO of TRL 1.14 (the _compute_loss logitless reproduces for 1.14 to 1.16) on that transformers. (A*-PO's stock
# run fails there before any logitless code: 4.x's generate() refuses the tokenizer's token_type_ids.)
PYTHONPATH=.trl-legacy/trl-1.14.2 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_trl_tpo.py
