#!/usr/bin/env bash
# README's run command as a newcomer runs it: a fresh venv, no extras, then `minillm generate` on
# the embedded model. It must print the completion and nothing at all on stderr (torch's NumPy
# warning, a deprecation, a progress bar would all fail it). Prints pytest's closing-line form.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python -m venv "$venv" && . "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
pip install -q torch==2.13.0 && pip install -q . || { echo "0 passed, 1 failed"; exit 1; }
out=$(cd /tmp && minillm generate "def fibonacci(n):" -n 8 --seed 0 2>"$venv/stderr")
rc=$?
fail=0
[ "$rc" -eq 0 ] || { echo "FAIL: minillm generate exited $rc"; fail=1; }
[[ "$out" == "def fibonacci(n):"* ]] || { echo "FAIL: unexpected output: $out"; fail=1; }
[ ! -s "$venv/stderr" ] || { echo "FAIL: stderr was not empty:"; cat "$venv/stderr"; fail=1; }
deactivate
rm -rf "$(dirname "$venv")"
[ "$fail" -eq 0 ] && { echo "fresh install: 1 passed, 0 failed"; exit 0; }
echo "fresh install: 0 passed, 1 failed"; exit 1
