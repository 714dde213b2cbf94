# Sourced by the scripts: makes sure uv exists and the project's environment is in sync with uv.lock.
set -euo pipefail
export UV_FROZEN=1
export UV_COMPILE_BYTECODE=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v uv >/dev/null 2>&1; then
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v uv >/dev/null 2>&1; then
    echo "installing uv (Python package manager) with pip…" >&2
    python3 -m pip install --user --quiet uv || python3 -m pip install --quiet --break-system-packages uv
  fi
fi
uv sync --frozen --quiet "$@"
