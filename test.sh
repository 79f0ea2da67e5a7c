#!/usr/bin/env bash
# Set up, then run the tests. Default: the fast suite (the `slow` subprocess and training suites left
# out, see tests/conftest.py SLOW_FILES); `bash test.sh --all` runs everything (CI does). Any other
# arguments go to pytest. Tests that need the published weights find them in $TAESD_WEIGHTS or
# ../shared/weights beside the checkout, and skip with the reason when there are none.
# Every temporary file goes to one folder that is removed at the end: nothing is left behind.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  shift
  select=()
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/taesd-tests.XXXXXX")
trap 'rm -rf "$work"' EXIT
TMPDIR="$work" .venv/bin/python -m pytest -p no:cacheprovider --basetemp "$work/pytest" "${select[@]}" "$@"
