#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install everything edgeweave
# needs, including the system packages the emulated testbed uses (apt-get, when run as root).
# Idempotent: a second run with nothing changed takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.edgeweave-installed"

need_apt=()
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v tc >/dev/null 2>&1 || need_apt+=(iproute2)
command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)
if [ "${#need_apt[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing system packages: ${need_apt[*]}" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}") >&2 \
    || echo "setup: apt-get failed; the testbed needs iproute2 (iperf3 is optional)" >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch/torchvision pinned per architecture (ENVIRONMENT.md): the pairs measured to import together.
case "$(uname -m)" in
  x86_64) TORCH=(torch==2.14.1 torchvision==0.29.1) ;;
  aarch64) TORCH=(torch==2.9.1 torchvision==0.24.1) ;;
  *) TORCH=(torch torchvision) ;;
esac
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "setup: installing ${TORCH[*]} (a few minutes the first time)" >&2
  "${PIP[@]}" "${TORCH[@]}" numpy
fi
echo "setup: installing edgeweave and its test tools" >&2
"${PIP[@]}" -e ".[test]"
touch "$STAMP"
