#!/usr/bin/env bash
# Here (a machine with PyPI), before a GPU session: the wheels the GPU image lacks (hydra-core, omegaconf,
# antlr4 runtime: pure Python) into .whl/, and the offline CIFAR-10 archive into .cache/data/. Both folders are
# git-ignored: copy them along with the working tree to the GPU machine, then run scripts/gpu_session.sh check there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl .cache/data
pins=$("$PY" - <<'PYEOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))
PYEOF
)
# pure-Python packages: wheels work on any Python 3 (antlr4's 4.9.3 is an sdist, so pip builds its wheel here)
# shellcheck disable=SC2086
"$PY" -m pip wheel -q --no-deps -w .whl $pins
src=${1:-${QREPRO_CIFAR10:?pass the CIFAR-10 archive (.tar.gz) as the first argument or set QREPRO_CIFAR10}}
[ -e .cache/data/cifar10-jpeg.tar.gz ] || cp "$src" .cache/data/
ls -la .whl .cache/data
du -sh .whl .cache/data
