#!/usr/bin/env bash
# The README's install step as a new user runs it, in a scratch directory: a virtual environment
# that sees Debian's PyTorch, `pip install --no-build-isolation ./python` (no network), then one
# call through the installed package with its gradient. A copy of the sources keeps pip's build
# files out of the tree under test.
#   bash python/tests/install_route.sh SOURCE_DIR
set -euo pipefail
source_dir=$(cd "$1" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/relbias"
cp -r "$source_dir"/{CMakeLists.txt,LICENSE,cmake,include,python} "$work/relbias/"
/usr/bin/python3 -m venv --system-site-packages "$work/env"
(cd "$work/relbias" && "$work/env/bin/pip" install --quiet --no-build-isolation ./python)
cd "$work"  # away from the sources: the import must find the installed package
"$work/env/bin/python" - <<'PY'
import torch, relbias
print("relbias from", relbias.__file__)
assert "/env/" in relbias.__file__, relbias.__file__
q, k, v = (torch.randn(1, 16, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
bias = relbias.ALiBi(heads=2).double()
o = relbias.attention(q, k, v, bias, causal=True)
o.sum().backward()
assert o.shape == (1, 16, 2, 8) and q.grad is not None and torch.isfinite(q.grad).all()
print("install route: passed")
PY
