#!/usr/bin/env bash
# Installs onnxruntime-web (pinned) into .node/node_modules for tests/test_onnx_web.py, which steps an
# exported TAEHV decoder graph in Node with the wasm backend (tests/web/step_video.mjs). Separate from
# scripts/setup.sh: it needs npm and the registry. Idempotent; never fails: without npm, or when the
# install fails, it prints one line and exits 0 (the test then skips with the reason).
cd "$(dirname "$0")/.." || exit 0
VERSION=1.31.1
dir=.node
if [ -f "$dir/node_modules/onnxruntime-web/package.json" ] && \
   grep -q "\"version\": \"$VERSION\"" "$dir/node_modules/onnxruntime-web/package.json"; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "setup_web: npm not found; onnxruntime-web not installed (tests/test_onnx_web.py will skip)"
  exit 0
fi
mkdir -p "$dir"
# Bounded: an offline machine gets its line after at most ~2 minutes, not npm's minutes of retries.
bound=()
command -v timeout >/dev/null 2>&1 && bound=(timeout 120)
if "${bound[@]}" npm install --prefix "$dir" --no-save --no-audit --no-fund --no-package-lock --loglevel=error \
     --fetch-retries=1 --fetch-timeout=30000 \
     "onnxruntime-web@$VERSION" >"$dir/install.log" 2>&1; then
  echo "setup_web: onnxruntime-web $VERSION installed in $dir/node_modules"
else
  echo "setup_web: npm install onnxruntime-web@$VERSION failed (see $dir/install.log); tests/test_onnx_web.py will skip"
fi
exit 0
