#!/bin/sh
# Install the CPU-only build of torch (the version pinned in requirements.txt) with the given pip:
#   scripts/install_torch.sh .venv/bin/pip
# The CPU build (torch==X+cpu) lives on the PyTorch CPU wheel index (TORCH_INDEX_URL); PyPI's Linux torch is the
# multi-GB CUDA build. When that index cannot be reached (a machine that only reaches the usual registries) pip
# still finds a +cpu wheel in a local wheel folder (PIP_FIND_LINKS); failing that, plain torch==X is installed
# from the usual indexes, with a warning.
set -eu
pip=${1:?usage: install_torch.sh PIP}
here=$(dirname "$0")
version=$(sed -n 's/^torch==\([^ #]*\).*/\1/p' "$here/../requirements.txt")
index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
# A short network timeout and no retries: an unreachable index costs seconds, not minutes, and no warnings.
if "$pip" install -q --timeout 15 --retries 0 --extra-index-url "$index" "torch==$version+cpu"; then
  exit 0
fi
echo "warning: torch $version+cpu is not reachable at $index (set TORCH_INDEX_URL or PIP_FIND_LINKS);" \
     "installing torch==$version from the usual indexes, which on Linux may be the multi-GB CUDA build" >&2
"$pip" install -q "torch==$version"
