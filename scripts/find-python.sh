#!/usr/bin/env sh
# Prints a Python >= 3.12 interpreter: the one .python-version names, else python3.12/3.13 on PATH.
want=$(cat "$(dirname "$0")/../.python-version" 2>/dev/null || echo 3.12)
for cand in "python$want" python3.12 python3.13 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
    command -v "$cand"; exit 0
  fi
done
echo "no Python >= 3.12 found (install python3.12)" >&2
exit 1
