#!/usr/bin/env bash
# Installs what the build and tests need on a fresh Debian 12 machine with a
# Rust toolchain. Sourced by ci/demo.sh and ci/test.sh; safe to run twice.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain first (rustup)" >&2
    exit 1
fi
# python3 reads the scheduler file in the demo; it ships with the base image,
# but a minimal machine may lack it.
if ! command -v python3 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3 >/dev/null
    else
        echo "python3 not found" >&2
        exit 1
    fi
fi
