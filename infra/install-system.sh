#!/usr/bin/env bash
# System packages the pipeline needs on a fresh Debian machine: ffmpeg (video I/O). Idempotent.
set -euo pipefail
if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi
ffmpeg -version | head -n 1
