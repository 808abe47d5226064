# Sourced by the other scripts: create or reuse the virtual environment and install this package into it.
# GTV_VENV chooses the environment folder (default: .venv in the repository root).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GTV_VENV="${GTV_VENV:-$REPO_ROOT/.venv}"
PYTHON_BIN="${PYTHON_BIN:-python3}"
SETUP_START=$(date +%s)

if [ ! -x "$GTV_VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $GTV_VENV"
  "$PYTHON_BIN" -m venv "$GTV_VENV"
fi
# shellcheck disable=SC1091
source "$GTV_VENV/bin/activate"
if ! python -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (this pairing keeps nnU-Net's trainer lookup working)"
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing nnunetv2_gtv from $REPO_ROOT"
python -m pip install -q "$REPO_ROOT[test]"
echo "[setup] registering nnunetv2_gtv's planner and trainers with nnU-Net"
nnunetv2-gtv register
nnunetv2-gtv check
echo "[setup] environment ready in $(( $(date +%s) - SETUP_START )) s; size $(du -sh "$GTV_VENV" | cut -f1) ($GTV_VENV)"
