#!/usr/bin/env bash
# Refresh requirements/lock.txt (behind `make lock`): resolve every extra of pyproject.toml, plus
# the build backend (setuptools), once, into exact versions with the sha256 of every file PyPI
# has for them. tools/setup.sh installs that file with --require-hashes and nothing else, then
# the project with --no-deps. Run this after changing a dependency in pyproject.toml, then check
# that environment.yml's pins still agree (tests/test_install.py says which differ) and commit
# both files.
#
# The resolver (pip-tools, pinned below) runs from its own venv under build/, with the Python
# that setup uses (PYTHON, default python3); the lock is resolved for that Python (3.11 here).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
PIP_TOOLS=pip-tools==7.6.2
TOOLS=build/lock-venv
LOCK=requirements/lock.txt

if [[ ! -x $TOOLS/bin/pip-compile ]]; then
    "$PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/pip" install --disable-pip-version-check -q "$PIP_TOOLS"
fi
mkdir -p "$(dirname "$LOCK")"
# --upgrade: a refresh takes the newest versions that satisfy pyproject.toml, not the old pins.
CUSTOM_COMPILE_COMMAND="make lock" "$TOOLS/bin/pip-compile" --upgrade --all-extras --all-build-deps --allow-unsafe --generate-hashes \
    --strip-extras --no-emit-find-links --no-emit-index-url --index-url https://pypi.org/simple \
    --quiet --output-file "$LOCK" pyproject.toml
# pip-compile lists the project itself (nsexp @ file://...) as a requirement of its own extras;
# setup installs it separately (--no-deps, editable), so that entry and its warning go.
"$PYTHON" - "$LOCK" <<'EOF'
import re
import sys

path = sys.argv[1]
text = open(path).read()
text = re.sub(
    r"# WARNING: pip install will require the following package to be hashed\.\n"
    r"# Consider using a hashable URL[^\n]*\n"
    r"nsexp @ file://[^\n]*\n(    #[^\n]*\n)*",
    "",
    text,
)
assert "nsexp @" not in text, "the project's own entry is still in the lock"
open(path, "w").write(text)
EOF
echo "lock: wrote $LOCK ($(grep -c '==' "$LOCK") pinned packages)" >&2
