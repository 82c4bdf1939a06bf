#!/usr/bin/env bash
# Tools the tests call as programs rather than import: Prometheus, promtool,
# Alertmanager and amtool from Debian's packages. Safe to run twice.
set -euo pipefail

need() { command -v "$1" >/dev/null 2>&1; }

if ! need promtool || ! need prometheus || ! need prometheus-alertmanager || ! need amtool; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-alertmanager >/dev/null
fi
# The Debian packages start daemons where an init system runs them; the tests
# start their own on free ports, so nothing here depends on those.
promtool --version | head -1
