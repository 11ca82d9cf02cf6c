#!/usr/bin/env bash
# Run today's tests against the product as it was at an older commit: "does this test fail before the fix?"
#
#   bash scripts/tests_on_commit.sh COMMIT [pytest args: test files, -k ...]
#
# The old tree goes to a git worktree under $TMPDIR, today's tests/ are copied into it, and a venv of its own
# imports the old package (editable install, no dependencies: it borrows .venv's site-packages through a .pth line).
# Its cache is separate ($TMPDIR/aqlm-compile-cache-COMMIT), so kernels and op libraries are built from the old
# sources. Prints pytest's summary with one line per failure; exits with pytest's status.
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(git rev-parse --short "${1:?usage: tests_on_commit.sh COMMIT [pytest args]}")
shift
root="${TMPDIR:-/tmp}/aqlm-compile-at-$commit"
tree="$root/tree" venv="$root/venv"
if [ ! -d "$tree" ]; then
  mkdir -p "$root"
  git worktree add --detach "$tree" "$commit" >/dev/null
fi
rm -rf "$tree/tests" && cp -r tests "$tree/tests"
if [ ! -x "$venv/bin/python" ]; then
  .venv/bin/python -m venv "$venv"
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/main-deps.pth"
  "$venv/bin/pip" install -q --no-deps -e "$tree"
fi
cd "$tree"
AQLM_COMPILE_CACHE="$root/cache" "$venv/bin/python" -m pytest -p no:cacheprovider -o addopts="" -q --tb=line -rfE \
  --continue-on-collection-errors -W ignore "$@"
