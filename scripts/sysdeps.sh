#!/usr/bin/env sh
# System packages llmaudit needs beyond pip: a small CJK font (Chinese in PDFs and plots) and
# HarfBuzz's subsetter (fast font subsetting in WeasyPrint). Idempotent; installs only what is missing.
set -eu
missing=""
fc-list :lang=zh family 2>/dev/null | grep -q . || missing="$missing fonts-wqy-microhei"
ldconfig -p 2>/dev/null | grep -q libharfbuzz-subset || missing="$missing libharfbuzz-subset0"
ldconfig -p 2>/dev/null | grep -q libpangoft2 || missing="$missing libpango-1.0-0 libpangoft2-1.0-0"
command -v fc-list >/dev/null 2>&1 || missing="$missing fontconfig"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
  echo "llmaudit: missing system packages:$missing (run as root: apt-get install -y$missing)" >&2
  exit 1
fi
echo "llmaudit: installing system packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
