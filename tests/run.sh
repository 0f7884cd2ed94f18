#!/usr/bin/env bash
# The whole test suite: the main tests in one pytest process, then the Triton kernel tests in a
# process of their own with TRITON_INTERPRET=1 (it must be set before triton is imported).
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pytest tests -q --ignore-glob='tests/test_kernels*' "$@"
main=$?
kern=0
if compgen -G "tests/test_kernels*.py" > /dev/null; then
    TRITON_INTERPRET=1 python -m pytest -q tests/test_kernels*.py "$@"
    kern=$?
fi
[ "$main" -eq 0 ] && [ "$kern" -eq 0 ]
