#!/usr/bin/env bash
# Checks the deployment snippets of docs/deploy.md (each is the ```yaml block after a
# `<!-- checked: NAME -->` line), so they work as printed:
#   kubernetes  every field against the Kubernetes API's schema (kubernetes-validate --strict: an
#               unknown or misplaced field fails) for 1.29, the first release with native sidecars
#               on by default, and 1.37; then what the docs promise: a native sidecar with a
#               startup probe, probes on /live and /ready, PGSIDECAR_URL and DATABASE_URL from a
#               Secret, and a pod grace period above the sidecar's worst case
#               (shutdown.drain_seconds + shutdown.grace_seconds + 5 from config/default.toml)
#   compose     against the Compose specification's schema (check-jsonschema's copy), then the
#               shared network namespace, the health check and a stop_grace_period above that worst case
#   prometheus  promtool check config (Debian's promtool is built without Kubernetes discovery:
#               there the kubernetes_sd_configs entries are checked against its documented fields
#               and promtool checks the rest)
# Takes about 20 s the first time (a venv of pinned PyPI packages, kept in ~/.cache/pgsidecar)
# and 3 s after. Installs promtool (Debian package prometheus) when missing and root.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${XDG_CACHE_HOME:-$HOME/.cache}/pgsidecar/deploy-check-venv
pins="kubernetes-validate==1.37.0 check-jsonschema==0.39.0 PyYAML==6.0.3"
if [ "$(cat "$venv/pins" 2>/dev/null)" != "$pins" ]; then
  echo "deploy-check.sh: installing $pins into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $pins
  echo "$pins" >"$venv/pins"
fi
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >&2
fi
command -v promtool >/dev/null 2>&1 || { echo "deploy-check.sh: promtool not found (Debian package prometheus)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for name in kubernetes compose prometheus; do
  awk -v mark="<!-- checked: $name -->" '$0 == mark {f = 1; next} f && /^```yaml/ {p = 1; next} p && /^```/ {exit} p' \
    docs/deploy.md >"$work/$name.yaml"
  [ -s "$work/$name.yaml" ] || { echo "deploy-check.sh: no '$name' snippet in docs/deploy.md" >&2; exit 1; }
done

failed=0
for v in 1.29.0 1.37.0; do
  "$venv/bin/kubernetes-validate" --quiet --strict -k "$v" "$work/kubernetes.yaml" || failed=1
done
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$work/compose.yaml" >/dev/null \
  || { "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$work/compose.yaml" || true; failed=1; }

# What the schemas cannot see: the choices docs/deploy.md explains.
"$venv/bin/python" - "$work" <<'EOF' || failed=1
import re, sys, tomllib, yaml

work = sys.argv[1]
cfg = tomllib.load(open("config/default.toml", "rb"))["shutdown"]
worst = cfg["drain_seconds"] + cfg["grace_seconds"] + 5
problems = []

def need(ok, what):
    if not ok:
        problems.append(what)

docs = list(yaml.safe_load_all(open(f"{work}/kubernetes.yaml")))
deploy = next(d for d in docs if d["kind"] == "Deployment")
secret = next(d for d in docs if d["kind"] == "Secret")
pod = deploy["spec"]["template"]["spec"]
# The app's own shutdown comes first in the same budget; at the least the sidecar's must fit.
need(pod.get("terminationGracePeriodSeconds", 30) > worst,
     f"kubernetes: terminationGracePeriodSeconds must exceed {worst} s (drain + grace + 5)")
side = next((c for c in pod.get("initContainers", []) if c["name"] == "pgsidecar"), None)
need(side is not None, "kubernetes: no init container named pgsidecar")
if side:
    need(side.get("restartPolicy") == "Always", "kubernetes: pgsidecar needs restartPolicy: Always (native sidecar)")
    ports = {p["name"]: p["containerPort"] for p in side.get("ports", [])}
    need(ports.get("ops") == 7071, "kubernetes: pgsidecar needs a port named ops = 7071")
    for probe, path in (("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        get = side.get(probe, {}).get("httpGet", {})
        need(get.get("path") == path and get.get("port") == "ops", f"kubernetes: {probe} must GET {path} on ops")
    env = {e["name"]: e for e in side.get("env", [])}
    ref = env.get("DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
    need(ref.get("name") == secret["metadata"]["name"] and ref.get("key") in secret.get("stringData", {}),
         "kubernetes: DATABASE_URL must come from the Secret shown")
    sc = side.get("securityContext", {})
    need(sc.get("runAsUser", 65532) == 65532, "kubernetes: runAsUser must be the image's user, 65532")
app = next((c for c in pod["containers"] if c["name"] == "app"), None)
need(app is not None and any(e["name"] == "PGSIDECAR_URL" and e.get("value") == "http://127.0.0.1:7070"
                             for e in app.get("env", [])), "kubernetes: the app needs PGSIDECAR_URL=http://127.0.0.1:7070")

compose = yaml.safe_load(open(f"{work}/compose.yaml"))["services"]
side, app = compose.get("pgsidecar", {}), compose.get("app", {})
def seconds(s):
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(s))
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0) if m else 0
need(seconds(side.get("stop_grace_period", "10s")) > worst, f"compose: stop_grace_period must exceed {worst} s")
need(app.get("network_mode") == "service:pgsidecar", "compose: the app must share the sidecar's network namespace")
need(app.get("depends_on", {}).get("pgsidecar", {}).get("condition") == "service_healthy",
     "compose: the app must wait for the sidecar's health check")
need(side.get("healthcheck", {}).get("test") == ["CMD", "/usr/local/bin/pgsidecar", "probe", "live"],
     "compose: the health check must be the image's (pgsidecar probe live)")
need(app.get("environment", {}).get("PGSIDECAR_URL") == "http://127.0.0.1:7070", "compose: the app needs PGSIDECAR_URL")

# Debian's promtool lacks Kubernetes discovery: check those entries here, and let promtool check
# the rest with each one replaced by a static target.
prom = yaml.safe_load(open(f"{work}/prometheus.yaml"))
sd_fields = {"api_server", "role", "kubeconfig_file", "namespaces", "selectors", "attach_metadata",
             "basic_auth", "authorization", "oauth2", "proxy_url", "no_proxy", "proxy_from_environment",
             "proxy_connect_header", "follow_redirects", "enable_http2", "tls_config"}
for job in prom["scrape_configs"]:
    for sd in job.pop("kubernetes_sd_configs", []):
        need(set(sd) <= sd_fields, f"prometheus: unknown kubernetes_sd_configs fields {set(sd) - sd_fields}")
        need(sd.get("role") in {"node", "service", "pod", "endpoints", "endpointslice", "ingress"},
             "prometheus: bad kubernetes_sd_configs role")
        job.setdefault("static_configs", []).append({"targets": ["sd.invalid:7071"]})
yaml.safe_dump(prom, open(f"{work}/prometheus-static.yaml", "w"))

for p in problems:
    print(f"deploy-check.sh: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

if promtool check config "$work/prometheus.yaml" >"$work/promtool.out" 2>&1; then
  :
elif grep -q "field kubernetes_sd_configs not found" "$work/promtool.out"; then
  promtool check config "$work/prometheus-static.yaml" >"$work/promtool.out" 2>&1 \
    || { cat "$work/promtool.out" >&2; failed=1; }
else
  cat "$work/promtool.out" >&2
  failed=1
fi

if [ "$failed" -ne 0 ]; then
  echo "deploy-check.sh: FAIL (docs/deploy.md)"
  exit 1
fi
echo "deploy-check.sh: PASS (docs/deploy.md: Kubernetes 1.29 and 1.37 schemas, Compose specification, promtool)"
