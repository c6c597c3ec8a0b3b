#!/usr/bin/env bash
# Boots the hypervisor with the default demo config in QEMU: a thin wrapper over
# `cargo xtask run`. Options pass through; QEMU's own arguments go after `--`, e.g.
#   ./qemu-run.sh --cmdline "test=boot" -- -d int -D /tmp/qemu.log
# (`cargo xtask help` lists the options).
set -euo pipefail
cd "$(dirname "$0")"
exec cargo xtask run "$@"
