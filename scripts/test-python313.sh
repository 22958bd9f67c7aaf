#!/usr/bin/env bash
# Run the test suite on Python 3.13 with Django 6, found through pyenv.
# Usage: scripts/test-python313.sh VENV_DIR PIP_REQUIREMENTS...
set -euo pipefail
venv=$1
shift

python313=""
if command -v pyenv >/dev/null 2>&1; then
    version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.13(\.[0-9]+)?$' | sort -V | tail -n 1 || true)
    if [[ -n "$version" ]]; then
        python313="$(pyenv root)/versions/$version/bin/python3.13"
    fi
fi
if [[ -z "$python313" ]] && command -v python3.13 >/dev/null 2>&1 && python3.13 -c '' 2>/dev/null; then
    python313=$(command -v python3.13)
fi
if [[ -z "$python313" || ! -x "$python313" ]]; then
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "!! Python 3.13 was not found (pyenv versions --bare lists no 3.13.x)" >&2
    echo "!! The Python 3.13 + Django 6 leg of the tests did NOT run." >&2
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    exit 0
fi

echo "== Python 3.13 + Django 6 ($python313) =="
if [[ ! -f "$venv/.installed" || pyproject.toml -nt "$venv/.installed" ]]; then
    "$python313" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q "$@"
    touch "$venv/.installed"
fi
"$venv/bin/python" -m pytest tests -q -rs
