#!/usr/bin/env bash
# Deployment examples, checked by tools rather than by eye:
#   - examples/kubernetes/*.yaml against the Kubernetes OpenAPI schemas
#     (kubernetes-validate from PyPI, --strict: unknown fields are errors),
#   - the ConfigMap's pg-tls-proxy.toml with `pg-tls-proxy check` (its
#     certificate paths pointed at throwaway certificates),
#   - examples/systemd/pg-tls-proxy.service with `systemd-analyze verify`
#     (any warning fails),
#   - the Dockerfile with `docker build`, when a container builder runs here.
# One line per check, then "N passed, M failed[, K skipped]".
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
env_dir=$root/target/deploy-env
passed=0; failed=0; skipped=0
ok()   { echo "$1: ok${2:+ $2}"; passed=$((passed + 1)); }
fail() { echo "$1: FAIL $2"; failed=$((failed + 1)); }
skip() { echo "$1: skip $2"; skipped=$((skipped + 1)); }
work=$(mktemp -d /tmp/pgtls-deploy.XXXXXX)
trap 'rm -rf "$work"' EXIT

proxy=${PG_TLS_PROXY_BIN:-$root/target/debug/pg-tls-proxy}
if [ ! -x "$proxy" ] || [ -n "$(find src Cargo.toml -newer "$proxy" -print -quit 2>/dev/null)" ]; then
  cargo build --quiet --bin pg-tls-proxy || { echo "cargo build failed"; exit 1; }
fi

# kubernetes-validate, pinned, in its own venv.
if [ ! -x "$env_dir/bin/kubernetes-validate" ]; then
  python3 -m venv "$env_dir" >/dev/null 2>&1 \
    && "$env_dir/bin/pip" install -q --disable-pip-version-check 'kubernetes-validate==1.37.0' >/dev/null 2>&1 \
    || { fail "kubernetes-validate install" "pip install kubernetes-validate==1.37.0"; }
fi

# 1. Manifests.
if [ -x "$env_dir/bin/kubernetes-validate" ]; then
  for f in examples/kubernetes/*.yaml; do
    out=$("$env_dir/bin/kubernetes-validate" --strict "$f" 2>&1); rc=$?
    if [ "$rc" != 0 ] || grep -q '^ERROR' <<<"$out"; then
      fail "kubernetes $f" "$(grep -m1 '^ERROR' <<<"$out")"
    elif grep -q "Couldn't find schema" <<<"$out"; then
      # cert-manager's CRDs are not in the Kubernetes schemas: their YAML
      # still parses, and their kinds are named here.
      ok "kubernetes $f" "(no schema for $(grep -o 'kind [A-Za-z]* with api version [^ ]*' <<<"$out" | sort -u | tr '\n' ' '))"
    else
      ok "kubernetes $f" "(schema $("$env_dir/bin/kubernetes-validate" --version 2>/dev/null | awk '{print $NF}'))"
    fi
  done

  # 2. The ConfigMap's configuration, checked by the proxy itself.
  "$proxy" dev-certs --out "$work/tls" --peer pg-tls-proxy-peers.default.svc.cluster.local >/dev/null
  cp "$work/tls/server.crt" "$work/tls/tls.crt"; cp "$work/tls/server.key" "$work/tls/tls.key"
  mkdir -p "$work/peer-tls" "$work/fleet"
  cp "$work/tls/peer-pg-tls-proxy-peers.default.svc.cluster.local.crt" "$work/peer-tls/tls.crt"
  cp "$work/tls/peer-pg-tls-proxy-peers.default.svc.cluster.local.key" "$work/peer-tls/tls.key"
  cp "$work/tls/fleet-ca.crt" "$work/peer-tls/ca.crt"
  head -c 32 /dev/urandom | base64 > "$work/fleet/cancel-key"
  "$env_dir/bin/python" - "$work" <<'PY' || fail "kubernetes configmap TOML" "could not extract it"
import sys, yaml
work = sys.argv[1]
doc = yaml.safe_load(open("examples/kubernetes/configmap.yaml"))
toml = doc["data"]["pg-tls-proxy.toml"]
for d in ("tls", "peer-tls", "fleet"):
    toml = toml.replace(f"/etc/pg-tls-proxy/{d}/", f"{work}/{d}/")
open(work + "/configmap.toml", "w").write(toml)
PY
  # As in the StatefulSet's first pod: the replica id is its ordinal.
  if out=$(HOSTNAME=pg-tls-proxy-0 "$proxy" check --config "$work/configmap.toml" 2>&1); then
    ok "kubernetes configmap pg-tls-proxy.toml" "(pg-tls-proxy check)"
  else
    fail "kubernetes configmap pg-tls-proxy.toml" "$(tail -n 1 <<<"$out")"
  fi
fi

# 3. systemd unit.
if command -v systemd-analyze >/dev/null 2>&1; then
  sed "s#/usr/local/bin/pg-tls-proxy#$proxy#g; s#^User=.*#User=root#; s#^Group=.*#Group=root#" \
    examples/systemd/pg-tls-proxy.service > "$work/pg-tls-proxy.service"
  out=$(systemd-analyze verify "$work/pg-tls-proxy.service" 2>&1); rc=$?
  if [ "$rc" = 0 ] && [ -z "$out" ]; then
    ok "systemd examples/systemd/pg-tls-proxy.service" "(systemd-analyze verify, $(systemd-analyze --version | head -n 1 | awk '{print $1, $2}'))"
  else
    fail "systemd examples/systemd/pg-tls-proxy.service" "$(head -n 1 <<<"$out")"
  fi
else
  skip "systemd examples/systemd/pg-tls-proxy.service" "(no systemd-analyze)"
fi

# 4. Dockerfile.
if command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; then
  if out=$(docker build -q -t pg-tls-proxy:ci . 2>&1); then ok "docker build" "$out"; else fail "docker build" "$(tail -n 1 <<<"$out")"; fi
else
  skip "docker build" "(no running container builder on this machine)"
fi

summary="$passed passed, $failed failed"
[ "$skipped" -gt 0 ] && summary+=", $skipped skipped"
echo "$summary"
[ "$failed" = 0 ]
