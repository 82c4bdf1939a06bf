"""The deploy artefacts, validated with everything this machine has.

There is no Docker engine and no cluster here, so each artefact is checked by
the closest real tool instead: `kubectl kustomize` renders the overlays,
kubernetes-validate and the prometheus-operator CRD models check every object,
checkov and hadolint lint, the Dockerfile's own install steps run in a fresh
virtualenv whose command then serves real metrics from a real worker, and
promtool, amtool and the Compose schema check the compose stack.

The linters live in .tools/ (installed by .ci/tools.sh); a missing tool fails
the test, it never skips it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = ROOT / ".tools" / "bin"
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
RULES_FILE = ROOT / "deploy" / "prometheus" / "celery-rules.yml"
DASHBOARDS = ROOT / "dashboards"
DASHBOARD_FILES = {"celery-overview.json", "celery-tasks.json", "celery-queues.json", "celery-periodic.json",
                   "celery-workers.json", "celery-objectives.json"}
OVERLAYS = {"redis": "redis://", "rabbitmq": "amqp://", "sqs": "sqs://"}
KUSTOMIZATIONS = ["base", *(f"overlays/{name}" for name in OVERLAYS)]
CRD_GROUP = "monitoring.coreos.com/"
# Each skipped checkov finding, justified in docs/deploy.md and in the
# manifests' checkov.io/skip annotations. Anything else that fails is a bug.
CHECKOV_SKIPS = {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_35", "CKV_K8S_43"}
KUBERNETES_VERSIONS = ["1.29.0", "1.37.0"]
METRICS_DIR = "/metrics"


def tool(name: str) -> str:
    """Path of a tool from .tools/ or the PATH; fails loudly when missing."""
    local = TOOLS_BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `bash .ci/tools.sh` (it installs every deploy tool)")
    return found


def tools_python() -> str:
    """The .tools/ virtualenv's Python, where checkov's and the validators' libraries live."""
    python = TOOLS_BIN / "python"
    if not python.exists():
        pytest.fail("the .tools virtualenv is missing: run `bash .ci/tools.sh`")
    return str(python)


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output, with a bound on its time."""
    kwargs.setdefault("timeout", 300)
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, metric: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    for line in text.splitlines():
        if not line.startswith(metric + "{") and not line.startswith(metric + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


# --------------------------------------------------------------------------
# Kubernetes


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every kustomization rendered once by `kubectl kustomize`, as objects."""
    kubectl = tool("kubectl")
    out: dict[str, list[dict[str, Any]]] = {}
    for name in KUSTOMIZATIONS:
        result = run([kubectl, "kustomize", str(K8S / name)])
        assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


@pytest.fixture(scope="session")
def rendered_files(rendered: dict[str, list[dict[str, Any]]],
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The rendered overlays written out, for the tools that read files."""
    folder = tmp_path_factory.mktemp("rendered")
    files = {}
    for name, objects in rendered.items():
        path = folder / (name.replace("/", "-") + ".yaml")
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        files[name] = path
    return files


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def serve_envvars() -> set[str]:
    """The environment variables `celery-signal-exporter serve` really reads."""
    from celery_signal_exporter.cli import serve

    names: set[str] = set()
    for param in serve.params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


def test_kustomize_renders_every_overlay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    expected = {
        ("ServiceAccount", "celery-signal-exporter"), ("Deployment", "celery-worker"),
        ("Deployment", "celery-broker-probe"), ("Service", "celery-broker-probe"),
        ("PodMonitor", "celery-worker"), ("ServiceMonitor", "celery-broker-probe"),
        ("Deployment", "celery-beat"), ("PodMonitor", "celery-beat"),
        ("NetworkPolicy", "celery-signal-exporter"), ("PrometheusRule", "celery-signal-exporter"),
        ("ConfigMap", "celery-signal-exporter-dashboards"),
    }
    assert {(o["kind"], o["metadata"]["name"]) for o in rendered["base"]} == expected
    for overlay, scheme in OVERLAYS.items():
        objects = rendered[f"overlays/{overlay}"]
        secrets = [o for o in objects if o["kind"] == "Secret"]
        assert len(secrets) == 1 and secrets[0]["metadata"]["name"].startswith("celery-broker-")
        url = base64.b64decode(secrets[0]["data"]["url"]).decode()
        assert url.startswith(scheme), url
        assert {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] != "Secret"} == expected
        assert {o["metadata"].get("namespace") for o in objects} == {"celery"}
        # kustomize rewrote every reference to the generated Secret's hashed name.
        for name in ("celery-worker", "celery-broker-probe", "celery-beat"):
            containers = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
            refs = {e["valueFrom"]["secretKeyRef"]["name"] for c in containers for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})}
            assert refs == {secrets[0]["metadata"]["name"]}, refs


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_worker_pod_runs_exporter_as_sidecar(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[f"overlays/{overlay}"]
    worker = find(objects, "Deployment", "celery-worker")
    pod = worker["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["worker", "exporter"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["celery-metrics"]["emptyDir"]["medium"] == "Memory"
    celery, sidecar = container(worker, "worker"), container(worker, "exporter")
    for c, read_only in ((celery, False), (sidecar, True)):
        assert env_of(c)["CELERY_EXPORTER_METRICS_DIR"] == METRICS_DIR
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts[METRICS_DIR]["name"] == "celery-metrics"
        assert mounts[METRICS_DIR].get("readOnly", False) is read_only
        assert mounts["/tmp"]["name"] == "tmp"
    assert celery["command"] == ["celery"] and celery["args"][0] == "worker"
    assert sidecar["args"] == ["serve"]
    assert sidecar["ports"] == [{"name": "metrics", "containerPort": 9808, "protocol": "TCP"}]
    assert env_of(sidecar)["CELERY_EXPORTER_PORT"] == "9808"
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert "celery inspect ping" in " ".join(celery["readinessProbe"]["exec"]["command"])
    assert "livenessProbe" not in celery, "a liveness probe through the broker restarts workers in an outage"
    # The PodMonitor finds these pods and this port.
    monitor = find(objects, "PodMonitor", "celery-worker")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_beat_runs_once_with_its_own_exporter(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """One beat (two would send every task twice), its metrics in its own pod, scraped by its own monitor."""
    objects = rendered[f"overlays/{overlay}"]
    beat = find(objects, "Deployment", "celery-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    pod = beat["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["beat", "exporter"]
    celery, sidecar = container(beat, "beat"), container(beat, "exporter")
    assert celery["command"] == ["celery"] and celery["args"][0] == "beat"
    assert sidecar["args"] == ["serve"]
    for c, read_only in ((celery, False), (sidecar, True)):
        assert env_of(c)["CELERY_EXPORTER_METRICS_DIR"] == METRICS_DIR
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts[METRICS_DIR]["name"] == "celery-metrics"
        assert mounts[METRICS_DIR].get("readOnly", False) is read_only
    monitor = find(objects, "PodMonitor", "celery-beat")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= beat["spec"]["template"]["metadata"]["labels"].items()
    worker_monitor = find(objects, "PodMonitor", "celery-worker")
    assert not worker_monitor["spec"]["selector"]["matchLabels"].items() <= \
        beat["spec"]["template"]["metadata"]["labels"].items(), "beat is scraped once, by its own monitor"


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_broker_probe_runs_once_from_the_secret(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[f"overlays/{overlay}"]
    probe = find(objects, "Deployment", "celery-broker-probe")
    assert probe["spec"]["replicas"] == 1
    assert probe["spec"]["strategy"] == {"type": "Recreate"}
    exporter = container(probe, "exporter")
    env = env_of(exporter)
    secret = next(o for o in objects if o["kind"] == "Secret")
    assert env["CELERY_EXPORTER_BROKER_URL"] == {
        "secretKeyRef": {"name": secret["metadata"]["name"], "key": "url"}}
    assert "CELERY_EXPORTER_METRICS_DIR" not in env, "the probe has no metrics directory to merge"
    service = find(objects, "Service", "celery-broker-probe")
    pod_labels = probe["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["publishNotReadyAddresses"] is True
    monitor = find(objects, "ServiceMonitor", "celery-broker-probe")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service["spec"]["ports"][0]["name"]]


def test_sqs_overlay_takes_its_credentials_from_irsa_and_holds_no_secret(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The role comes from the service account's IRSA annotation; no key, secret or token in any object."""
    objects = rendered["overlays/sqs"]
    account = find(objects, "ServiceAccount", "celery-signal-exporter")
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::[0-9]{12}:role/[\w+=,.@-]+", role), role
    assert account["automountServiceAccountToken"] is False
    secret = next(o for o in objects if o["kind"] == "Secret")
    assert base64.b64decode(secret["data"]["url"]).decode() == "sqs://", "no credentials in the broker URL"
    for name in ("celery-worker", "celery-broker-probe", "celery-beat"):
        pod = find(objects, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "celery-signal-exporter", name
        for c in pod["containers"]:
            assert not {n for n in env_of(c) if n.startswith("AWS_")}, "IRSA's webhook sets the AWS variables"
    text = json.dumps(objects)
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text, re.I)
    probe = container(find(objects, "Deployment", "celery-broker-probe"), "exporter")
    options = json.loads(env_of(probe)["CELERY_EXPORTER_TRANSPORT_OPTIONS"])
    assert set(options) == {"region", "queue_name_prefix"}, options


def test_manifests_only_use_environment_variables_the_exporter_reads(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A renamed CLI option would otherwise leave a silently ignored variable."""
    known = serve_envvars()
    used = set()
    for objects in rendered.values():
        for o in objects:
            if o["kind"] == "Deployment":
                for c in o["spec"]["template"]["spec"]["containers"]:
                    used |= {name for name in env_of(c) if name.startswith("CELERY_EXPORTER_")}
    assert used, "no exporter variables found"
    assert used <= known, f"not read by `serve`: {sorted(used - known)}"


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_pods_are_restricted(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """The Pod Security 'restricted' profile, and resources on every container."""
    for deployment in (o for o in rendered[overlay] if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert set(c["resources"]["requests"]) == {"cpu", "memory"}
            assert set(c["resources"]["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, version: str) -> None:
    """kubernetes-validate in strict mode: unknown fields fail too."""
    validate = tool("kubernetes-validate")
    for name, objects in rendered.items():
        core = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUP)]
        path = tmp_path / (name.replace("/", "-") + ".yaml")
        path.write_text(yaml.safe_dump_all(core))
        result = run([validate, "--strict", "-k", version, str(path)])
        assert result.returncode == 0, result.stdout + result.stderr
        passed = [line for line in result.stdout.splitlines() if " passed for resource " in line]
        assert len(passed) == len(core), result.stdout + result.stderr


CRD_CHECK = """
import json, sys, yaml
from cloudcoil.models.prometheus_operator import v1
out = {}
for path in sys.argv[1:]:
    out[path] = []
    for doc in yaml.safe_load_all(open(path)):
        model = getattr(v1, doc["kind"])
        try:
            back = model.model_validate(doc).model_dump(by_alias=True, exclude_none=True, mode="json")
        except Exception as exc:
            out[path].append([doc["kind"], str(exc)])
            continue
        # The models ignore unknown fields; a round trip that loses one is a failure.
        out[path].append([doc["kind"], "ok" if back == doc else "unknown fields dropped: " + json.dumps(back)])
print(json.dumps(out))
"""


def test_prometheus_operator_objects_validate_against_crd_schemas(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """PodMonitor, ServiceMonitor and PrometheusRule against prometheus-operator's
    CRD schemas as shipped by cloudcoil-models-prometheus-operator (pydantic
    models generated from the v0.80.1 CRDs), with a round trip so that an
    unknown field fails as it would under `kubectl apply --validate=strict`."""
    expected = {}
    for name, objects in rendered.items():
        crds = [o for o in objects if o["apiVersion"].startswith(CRD_GROUP)]
        assert {o["kind"] for o in crds} == {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
        path = tmp_path / (name.replace("/", "-") + ".yaml")
        path.write_text(yaml.safe_dump_all(crds))
        expected[str(path)] = [[o["kind"], "ok"] for o in crds]
    result = run([tools_python(), "-c", CRD_CHECK, *expected])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


def test_prometheusrule_rules_pass_promtool(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    rule = find(rendered["base"], "PrometheusRule", "celery-signal-exporter")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = run([tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found and int(found.group(1)) > 0, result.stdout


def test_dashboards_configmap_carries_every_dashboard(rendered: dict[str, list[dict[str, Any]]]) -> None:
    config_map = find(rendered["base"], "ConfigMap", "celery-signal-exporter-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(config_map["data"]) == DASHBOARD_FILES
    for key, text in config_map["data"].items():
        assert json.loads(text) == json.loads((DASHBOARDS / key).read_text()), f"{key} differs from dashboards/"


# --------------------------------------------------------------------------
# Linters


@pytest.fixture(scope="session")
def checkov_reports(rendered_files: dict[str, Path]) -> list[dict[str, Any]]:
    """One checkov run over every rendered overlay and the Dockerfile.

    Offline, checkov has no severities (they come from its vendor's API), so
    every failed check counts, whatever its severity."""
    cmd = [tool("checkov"), "--framework", "kubernetes", "dockerfile", "--skip-download", "--output", "json",
           "--file", str(ROOT / "Dockerfile")]
    for name in KUSTOMIZATIONS[1:]:
        cmd += ["--file", str(rendered_files[name])]
    result = run(cmd)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def test_checkov_finds_nothing_unjustified(checkov_reports: list[dict[str, Any]]) -> None:
    by_type = {r["check_type"]: r for r in checkov_reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}
    failed = [(r["check_type"], c["check_id"], c["resource"], c["check_name"])
              for r in checkov_reports for c in r["results"]["failed_checks"]]
    assert failed == []
    assert by_type["kubernetes"]["summary"]["passed"] > 100
    assert by_type["dockerfile"]["summary"]["passed"] > 20
    skipped = {c["check_id"] for r in checkov_reports for c in r["results"]["skipped_checks"]}
    assert skipped == CHECKOV_SKIPS
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for check_id in CHECKOV_SKIPS:
        assert check_id in docs, f"{check_id} is skipped without a justification in docs/deploy.md"


def test_hadolint_is_clean() -> None:
    result = run([tool("hadolint"), "--format", "json", "--failure-threshold", "style", str(ROOT / "Dockerfile")])
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout + result.stderr


# --------------------------------------------------------------------------
# The Dockerfile


def dockerfile_stages() -> list[dict[str, Any]]:
    """The Dockerfile as stages of (instruction, argument) pairs, continuations joined."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                            if not line.lstrip().startswith("#")))
    stages: list[dict[str, Any]] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, argument = line.strip().partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = argument.split()
            stages.append({"from": parts[0], "name": parts[2] if len(parts) > 2 else None, "steps": []})
        else:
            stages[-1]["steps"].append((instruction, argument.strip()))
    return stages


def env_pairs(argument: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(argument))


def test_dockerfile_shape() -> None:
    build, final = dockerfile_stages()
    assert build["from"] == final["from"] == "python:3.11-slim"
    steps = final["steps"]
    kinds = [instruction for instruction, _ in steps]
    # Nothing in the final stage installs anything: it only copies the virtualenv.
    assert "ADD" not in kinds
    assert all(not re.search(r"apt-get|pip |gcc|build-essential", arg) for kind, arg in steps if kind == "RUN")
    assert [arg for kind, arg in steps if kind == "COPY"] == [
        "--from=build /opt/celery-signal-exporter /opt/celery-signal-exporter"]
    env: dict[str, str] = {}
    for kind, arg in steps:
        if kind == "ENV":
            env.update(env_pairs(arg))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/celery-signal-exporter/bin:")
    assert dict(steps)["USER"] == "10001:10001"
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["celery-signal-exporter"]
    labels = " ".join(arg for kind, arg in steps if kind == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_lets_in_every_copy_source() -> None:
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = set()
    for stage in dockerfile_stages():
        for kind, arg in stage["steps"]:
            if kind == "COPY" and not arg.startswith("--from"):
                sources |= {s.rstrip("/") for s in arg.split()[:-1]}
    assert sources and sources == allowed


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build stage run outside Docker: its COPY steps into a scratch WORKDIR
    and its RUN steps, verbatim, under /bin/sh with VIRTUAL_ENV pointed at a
    fresh directory. Returns the virtualenv the final stage would copy."""
    build, _ = dockerfile_stages()
    scratch = tmp_path_factory.mktemp("image")
    venv = scratch / "venv"
    env = {**os.environ}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    # `python` is the base image's interpreter: this machine's, not our .venv's.
    shim = scratch / "bin"
    shim.mkdir()
    (shim / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env["PATH"] = f"{shim}:/usr/local/bin:/usr/bin:/bin"
    workdir = scratch / "src"
    ran = 0
    for kind, arg in build["steps"]:
        if kind == "ENV":
            env.update(env_pairs(arg))
            if "VIRTUAL_ENV" in env_pairs(arg):
                env["VIRTUAL_ENV"] = str(venv)
        elif kind == "WORKDIR":
            workdir.mkdir(parents=True, exist_ok=True)
        elif kind == "COPY":
            *sources, dest = arg.split()
            for source in sources:
                src, target = ROOT / source, workdir / dest
                if src.is_dir():  # Docker copies a directory's contents into dest
                    shutil.copytree(src, target, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                elif dest.endswith("/"):  # a file into a directory keeps its name
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, target / src.name)
                else:
                    shutil.copy(src, target)
        elif kind == "RUN":
            result = run(["/bin/sh", "-c", arg], cwd=workdir, env=env, timeout=480)
            assert result.returncode == 0, f"RUN {arg}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            ran += 1
    assert ran == 1, "the build stage should have exactly one RUN step"
    assert (venv / "bin" / "celery-signal-exporter").exists()
    return venv


def final_stage_env(venv: Path) -> dict[str, str]:
    """The final stage's ENV, with the image's virtualenv path mapped to ours."""
    _, final = dockerfile_stages()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for kind, arg in final["steps"]:
        if kind == "ENV":
            for key, value in env_pairs(arg).items():
                env[key] = value.replace("/opt/celery-signal-exporter", str(venv)).replace("$PATH", env["PATH"])
    return env


def test_installed_command_answers_help(image_venv: Path) -> None:
    env = final_stage_env(image_venv)
    result = run(["celery-signal-exporter", "--help"], env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "demo" in result.stdout
    result = run(["celery-signal-exporter", "serve", "--help"], env=env, timeout=60)
    assert result.returncode == 0 and "CELERY_EXPORTER_BROKER_URL" in result.stdout


@pytest.fixture
def redis_db(redis_url: str) -> str:
    """A Redis database of its own on the session's private redis-server, emptied before and after."""
    return redis_url


def test_image_serves_metrics_from_an_instrumented_worker(
        image_venv: Path, tmp_path: Path, redis_db: str) -> None:
    """The image as both halves of the pod: the compose demo app's worker run
    with `celery` from the image's virtualenv, the exporter serving its files,
    the Dockerfile's HEALTHCHECK passing, and nothing written into the image."""
    env = final_stage_env(image_venv)
    before = {p for p in image_venv.rglob("*")}
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    port = free_port()
    app_env = {**env, "PYTHONPATH": str(COMPOSE_DIR / "app"), "CELERY_APP": "demo_tasks",
               "CELERY_BROKER_URL": redis_db, "CELERY_EXPORTER_METRICS_DIR": str(metrics), "TMPDIR": str(tmp_path)}
    serve_log = (tmp_path / "serve.log").open("w")
    worker_log = (tmp_path / "worker.log").open("w")
    serve = subprocess.Popen(["celery-signal-exporter", "serve", "--metrics-dir", str(metrics), "--host", "127.0.0.1",
                              "--port", str(port)], env={**env, "CELERY_EXPORTER_PORT": str(port)},
                             stdout=subprocess.DEVNULL, stderr=serve_log)
    worker = subprocess.Popen(["celery", "worker", "--concurrency=1", "--queues=default,slow", "--loglevel=WARNING",
                               "--hostname", "deploy-test@%h"], env=app_env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=worker_log)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_get(base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "exporter never became ready"
            time.sleep(0.2)
        _, final = dockerfile_stages()
        healthcheck = dict(final["steps"])["HEALTHCHECK"]
        check = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
        result = run(check, env={**env, "CELERY_EXPORTER_PORT": str(port)}, timeout=30)
        assert result.returncode == 0, result.stderr
        # Ten tasks through the real worker, published by the producer's own code.
        result = run(["python", "-c", "from demo_tasks import add\nfor i in range(10): add.delay(i, 1)"],
                     env=app_env, cwd=tmp_path, timeout=60)
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = http_get(base + "/metrics")[1]
            if sample(text, "celery_task_succeeded_total", name="demo_tasks.add", queue_name="default") == 10:
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(0.5)
        assert sample(text, "celery_task_succeeded_total", name="demo_tasks.add", queue_name="default") == 10, text
        assert sample(text, "celery_task_sent_total", name="demo_tasks.add", queue_name="default") == 10
        assert re.search(r'^celery_worker_up\{hostname="deploy-test@[^"]+"\} 1\.0$', text, re.M), text
        assert sample(text, "celery_exporter_build_info") == 1
    finally:
        for process in (worker, serve):
            process.send_signal(signal.SIGTERM)
        for process in (worker, serve):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        serve_log.close()
        worker_log.close()
    created = sorted(str(p.relative_to(image_venv)) for p in set(image_venv.rglob("*")) - before)
    assert created == [], f"written into the read-only image: {created[:10]}"


# --------------------------------------------------------------------------
# Compose


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str, bool]]:
    """(host path, container path, read-only) of a service's bind mounts."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE_DIR / source).resolve(), target, mode == ["ro"]))
    return mounts


def container_root(service: dict[str, Any], root: Path) -> Path:
    """A directory laid out as the service's container sees its bind mounts."""
    for host, target, _ in bind_mounts(service):
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if host.is_dir():
            shutil.copytree(host, dest)
        else:
            shutil.copy(host, dest)
    return root


def test_compose_file_matches_the_compose_schema(compose: dict[str, Any]) -> None:
    """Against the Compose specification's JSON schema (as vendored by the last
    Python docker-compose, 1.29.2): an unknown key or a wrong type fails."""
    schema = ROOT / ".tools" / "schemas" / "compose_spec.json"
    if not schema.exists():
        pytest.fail("the Compose schema is missing: run `bash .ci/tools.sh`")
    script = ("import json, sys, jsonschema, yaml\n"
              "schema = json.load(open(sys.argv[1]))\n"
              "errors = jsonschema.Draft201909Validator(schema).iter_errors(yaml.safe_load(open(sys.argv[2])))\n"
              "print(json.dumps([[list(map(str, e.path)), e.message] for e in errors]))\n")
    result = run([tools_python(), "-c", script, str(schema), str(COMPOSE_FILE)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_compose_mounts_exist_and_share_the_metrics_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "rabbitmq", "worker", "exporter", "producer", "broker-probe", "prometheus", "alertmanager",
            "grafana"} <= set(services)
    for name, service in services.items():
        for host, _, _ in bind_mounts(service):
            assert host.exists(), f"{name} mounts {host}, which does not exist"
        if "build" in service:
            assert (COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    worker, sidecar = services["worker"], services["exporter"]
    assert worker["entrypoint"] == ["celery"]
    assert worker["environment"]["CELERY_EXPORTER_METRICS_DIR"] == METRICS_DIR
    assert f"celery-metrics:{METRICS_DIR}" in worker["volumes"]
    assert f"celery-metrics:{METRICS_DIR}:ro" in sidecar["volumes"]
    assert sidecar["command"] == ["serve", "--metrics-dir", METRICS_DIR]
    assert "celery-metrics" in compose["volumes"]
    assert services["broker-probe"]["environment"]["CELERY_EXPORTER_BROKER_URL"].split() == [
        "redis://redis:6379/0", "amqp://celery:celery@rabbitmq:5672//"]
    for name in ("worker", "exporter", "producer", "broker-probe"):
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
    # The demo app's modules are where PYTHONPATH says.
    assert (COMPOSE_DIR / "app" / "demo_tasks.py").is_file() and (COMPOSE_DIR / "app" / "producer.py").is_file()


def rule_job_selector() -> re.Pattern[str]:
    """The job matcher the generated rules use, so scrape jobs can be held to it."""
    jobs = set(re.findall(r'job=~"([^"]+)"', RULES_FILE.read_text()))
    assert len(jobs) == 1, jobs
    return re.compile(jobs.pop())


def test_compose_prometheus_config_passes_promtool(compose: dict[str, Any], tmp_path: Path) -> None:
    service = compose["services"]["prometheus"]
    root = container_root(service, tmp_path)
    config_path = root / "etc" / "prometheus" / "prometheus.yml"
    result = run([tool("promtool"), "check", "config", str(config_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found and int(found.group(1)) > 0, result.stdout
    config = yaml.safe_load(config_path.read_text())
    selector = rule_job_selector()
    celery_jobs = {job["job_name"]: job for job in config["scrape_configs"] if job["job_name"] != "prometheus"}
    assert set(celery_jobs) == {"celery-worker", "celery-broker-probe"}
    for name, job in celery_jobs.items():
        assert selector.fullmatch(name), f"job {name} escapes the rules' selector {selector.pattern}"
        (target,) = job["static_configs"][0]["targets"]
        host, port = target.split(":")
        assert host in compose["services"] and port == "9808", target
    (alertmanager,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanager.split(":")[0] in compose["services"]


def test_compose_alertmanager_config_passes_amtool(compose: dict[str, Any], tmp_path: Path) -> None:
    root = container_root(compose["services"]["alertmanager"], tmp_path)
    result = run([tool("amtool"), "check-config", str(root / "etc" / "alertmanager" / "alertmanager.yml")])
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboards(compose: dict[str, Any], tmp_path: Path) -> None:
    root = container_root(compose["services"]["grafana"], tmp_path)
    provisioning = root / "etc" / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "celery.yml").read_text())["providers"]
    folder = root / provider["options"]["path"].lstrip("/")
    assert {p.name for p in folder.glob("*.json")} == DASHBOARD_FILES
    for path in folder.glob("*.json"):
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"


def test_compose_demo_app_registers_its_tasks(tmp_path: Path) -> None:
    """The worker's app imports and is instrumented, without a broker."""
    script = ("import demo_tasks, exporter\n"
              "print(sorted(n for n in demo_tasks.app.tasks if n.startswith('demo_tasks.')))\n")
    env = {**os.environ, "PYTHONPATH": str(COMPOSE_DIR / "app"), "CELERY_BROKER_URL": "memory://",
           "CELERY_EXPORTER_METRICS_DIR": str(tmp_path)}
    result = run([sys.executable, "-c", script], env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(
        ["demo_tasks.add", "demo_tasks.flaky", "demo_tasks.retrying", "demo_tasks.slow"])
    compile((COMPOSE_DIR / "app" / "producer.py").read_text(), "producer.py", "exec")


# --------------------------------------------------------------------------
# Examples


def test_example_prometheus_config_passes_promtool(rendered: dict[str, list[dict[str, Any]]],
                                                   tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes service discovery, so the
    kubernetes_sd_configs blocks are swapped for a static target and everything
    else (relabelling, rule files, alerting) goes through promtool unchanged;
    the relabel rules are then held to the labels the manifests really set."""
    example = ROOT / "deploy" / "examples"
    config = yaml.safe_load((example / "prometheus.yml").read_text())
    roles = {}
    for job in config["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            roles[job["job_name"]] = [sd["role"] for sd in job.pop("kubernetes_sd_configs")]
            job["static_configs"] = [{"targets": ["stand-in:9808"]}]
    assert roles == {"celery-worker": ["pod"], "celery-broker-probe": ["endpoints"]}
    (tmp_path / "examples").mkdir()
    (tmp_path / "prometheus").mkdir()
    shutil.copy(RULES_FILE, tmp_path / "prometheus")
    (tmp_path / "examples" / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run([tool("promtool"), "check", "config", str(tmp_path / "examples" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: [1-9]\d* rules found", result.stdout), result.stdout
    selector = rule_job_selector()
    assert all(selector.fullmatch(job["job_name"]) for job in config["scrape_configs"])
    objects = rendered["overlays/redis"]
    pod_labels = find(objects, "Deployment", "celery-worker")["spec"]["template"]["metadata"]["labels"]
    keeps = {r["source_labels"][0]: r["regex"] for job in config["scrape_configs"]
             for r in job.get("relabel_configs", []) if r.get("action") == "keep"}
    label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", "celery-signal-exporter/scrape")
    assert keeps[label] == pod_labels["celery-signal-exporter/scrape"]
    assert keeps["__meta_kubernetes_service_name"] == find(objects, "Service", "celery-broker-probe")["metadata"][
        "name"]


def test_example_alertmanager_config_passes_amtool() -> None:
    path = ROOT / "deploy" / "examples" / "alertmanager.yml"
    result = run([tool("amtool"), "check-config", str(path)])
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    # Routes and inhibitions name alerts and severities the rules really have.
    rules = [r for g in yaml.safe_load(RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r]
    alerts = {r["alert"] for r in rules}
    severities = {r["labels"]["severity"] for r in rules}
    text = path.read_text()
    assert set(re.findall(r'alertname="([^"]+)"', text)) <= alerts
    assert set(re.findall(r'severity="([^"]+)"', text)) == severities
