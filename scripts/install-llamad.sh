#!/usr/bin/env bash
# Install llamad into a venv only when what pip would install has changed: pip takes about 10 s to
# find out that nothing has, this a few milliseconds. What counts: SPEC (the extras), setup.cfg and
# pyproject.toml (the pinned versions) and the package's Python files and status page; their hash is kept in
# VENV/.llamad-install after each install, and an install that fails leaves none.
# Usage: install-llamad.sh VENV SPEC   (run from the checkout's root)
set -euo pipefail

venv=${1:?usage: install-llamad.sh VENV SPEC}
spec=${2:?usage: install-llamad.sh VENV SPEC}
stamp="$venv/.llamad-install"

# Names and contents: a file renamed or removed changes the hash too. Only *.py and the page's files:
# the __pycache__ and twisted's dropin.cache that running llamad writes beside them change nothing pip installs.
hash=$({ printf 'spec %s\n' "$spec"
         find llamad twisted/plugins -type f \( -name '*.py' -o -path 'llamad/gateway/ui/*' \) -print0 \
             | LC_ALL=C sort -z | xargs -0 sha256sum
         sha256sum setup.cfg pyproject.toml; } | sha256sum | cut -d' ' -f1)

if [ -x "$venv/bin/llamad" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
    exit 0
fi
rm -f "$stamp"
echo "$venv/bin/pip install '$spec'"
"$venv/bin/pip" --disable-pip-version-check -q install "$spec"
echo "$hash" >"$stamp"
