#!/usr/bin/env bash
# Builds the extension with -fsanitize=address,undefined and -Werror, and runs the whole test suite
# against it (the package's Python files plus the sanitized _core, put first on PYTHONPATH).
# Usage: tools/sanitize.sh [pytest args]   (needs gcc's libasan/libubsan, cmake, and pybind11 in the env)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
build=build/sanitize
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DFASTREC_SANITIZE=ON -DFASTREC_WERROR=ON \
  -DPython_EXECUTABLE="$(command -v "$py")" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" \
  -DSKBUILD_PROJECT_VERSION=0.0.0+sanitize >/dev/null
cmake --build "$build" -j "$(nproc)"
pkg="$build/pkg"
rm -rf "$pkg" && mkdir -p "$pkg"
cp -r python/fastrec "$pkg/" && cp "$build"/_core*.so "$pkg/fastrec/"
# Python itself is not instrumented: preload the runtimes; CPython's own allocations are not leaks to report.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
PYTHONPATH="$pkg" "$py" -c "import fastrec, sys; assert fastrec.__version__ == '0.0.0+sanitize', fastrec.__file__"
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
PYTHONPATH="$pkg" "$py" -m pytest -q "$@"
