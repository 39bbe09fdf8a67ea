#!/usr/bin/env bash
# The GPU check (benchmarks/full_scale_step.py) on a machine that has torch and nothing of ours:
# no network, the project not installed, no pydantic. What the check needs beyond torch comes as
# wheels in wheels/ (benchmarks/README.md, "GPU check", says how to download them); they are
# unpacked into a temporary folder that goes on PYTHONPATH with this repository, and removed after.
#
#   bash benchmarks/gpu_check.sh OUT.json [full_scale_step.py options]
#   bash benchmarks/gpu_check.sh out/full_scale_step.json --dry-run     # seconds, CPU: the path works
#
# PYTHON: the interpreter that has torch (default python3); MUTRANSFER_WHEELS: the wheels folder.
# Exit status: the check's own; 2 for a usage error or when pydantic does not import from the wheels.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheels="${MUTRANSFER_WHEELS:-$root/wheels}"
python="${PYTHON:-python3}"

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT.json [full_scale_step.py options]" >&2
  exit 2
fi
out="$1"
shift

site="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-wheels.XXXXXX")"
trap 'rm -rf "$site"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

shopt -s nullglob
found=("$wheels"/*.whl)
for whl in "${found[@]}"; do  # a wheel is a zip of what goes in site-packages
  "$python" -m zipfile -e "$whl" "$site"
done
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"

if ! why="$("$python" -c 'import pydantic' 2>&1)"; then
  echo "error: pydantic does not import with the ${#found[@]} wheel(s) in $wheels: ${why##*$'\n'}" >&2
  echo "  download them for this Python ($("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'))" \
       "as benchmarks/README.md ('GPU check') shows" >&2
  exit 2
fi

"$python" "$root/benchmarks/full_scale_step.py" --json "$out" "$@"
