#!/usr/bin/env bash
# Regenerate the locks (CPython 3.11, Linux x86_64) after editing pyproject.toml or requirements/*.in:
#   bash requirements/lock.sh          (needs uv: pip install uv)
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --annotation-style line)
{
  echo "# The runtime lock: CPython 3.11, Linux x86_64. Regenerate with: bash requirements/lock.sh"
  echo "#   (uv pip compile pyproject.toml requirements/runtime.in ${common[*]})"
  "$UV" pip compile -q pyproject.toml requirements/runtime.in "${common[@]}"
} > requirements/runtime.txt
{
  echo "# Test and lint tools, resolved against the runtime lock. Regenerate with: bash requirements/lock.sh"
  echo "#   (uv pip compile requirements/dev.in -c requirements/runtime.txt ${common[*]})"
  "$UV" pip compile -q requirements/dev.in -c requirements/runtime.txt "${common[@]}"
} > requirements/dev.txt
