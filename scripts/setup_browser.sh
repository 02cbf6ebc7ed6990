#!/usr/bin/env bash
# Chromium from the distribution's packages and playwright-core from npm, for the browser tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is not installed and cannot be installed here (need root and apt-get)" >&2
    exit 1
  fi
fi
if command -v npm >/dev/null 2>&1; then
  mkdir -p "$ROOT/.browser"
  (cd "$ROOT/.browser" && [ -d node_modules/playwright-core ] || npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null)
else
  echo "npm is not installed: the browser tests need playwright-core" >&2
  exit 1
fi
