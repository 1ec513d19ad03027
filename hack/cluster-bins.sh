#!/usr/bin/env bash
# Builds, once, the real binaries behind the cluster and end-to-end tests, from the Go module proxy:
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl   k8s.io/kubernetes (wrapper module hack/kube)
#   etcd                                                               go.etcd.io/etcd/server/v3 (hack/kube)
#   kwok                                                               sigs.k8s.io/kwok/cmd/kwok (hack/kube)
#   helm                                                               helm.sh/helm/v3/cmd/helm (hack/kube)
#   versitygw (S3-compatible object store, POSIX backend)              github.com/versity/versitygw (hack/objstore)
#   kueue (controller manager) + manifests.yaml                        sigs.k8s.io/kueue/cmd/kueue (hack/kueue)
#
# Kueue's manifests.yaml (CRDs, webhook configurations, RBAC, ...) is rendered at build time from the
# module's own config/default with `kubectl kustomize` (no network: the module source is in the Go
# module cache after `go mod download`), so the harness applies exactly what that release installs.
#
# The versions are the ones pinned in hack/kube/go.mod, hack/objstore/go.mod and hack/kueue/go.mod. Binaries land in
#   ${TINV_CACHE_DIR:-$HOME/.cache/tinv}/bin/<component>-<version>/
# and are reused afterwards: a second run only checks that they are there. Everything in hack/kube is
# built by ONE `go build`, so the Kubernetes packages that several commands share compile once.
#
# Usage: hack/cluster-bins.sh [--check] [--env] [--quiet]
#   --check   build nothing; exit 1 when a binary is missing
#   --env     finally print NAME=PATH lines (KUBE_APISERVER=..., ETCD=..., ...) for the test harness
#             (with --check also when something is missing: the paths the cache would hold)
#   --quiet   only errors (and the --env lines)
# Environment: TINV_CACHE_DIR (cache root), GO (the go command), TINV_BUILD_JOBS (go build -p, default: nproc).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${TINV_CACHE_DIR:-${HOME}/.cache/tinv}"
BIN="${CACHE}/bin"

check=0; print_env=0; quiet=0
for arg in "$@"; do
  case "$arg" in
    --check) check=1 ;;
    --env) print_env=1 ;;
    --quiet) quiet=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "cluster-bins: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

say() { if [ "$quiet" = 0 ]; then echo "cluster-bins: $*" >&2; fi; }
die() { echo "cluster-bins: ERROR: $*" >&2; exit 1; }

# The version a wrapper module pins for a module path (from its require block).
modver() { awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == "require" ? $3 : $2); exit }' "$1"; }

KUBE_MOD="${ROOT}/hack/kube/go.mod"
OBJ_MOD="${ROOT}/hack/objstore/go.mod"
KUEUE_MOD="${ROOT}/hack/kueue/go.mod"
KUBE_VERSION="$(modver "$KUBE_MOD" k8s.io/kubernetes)"
ETCD_VERSION="$(modver "$KUBE_MOD" go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(modver "$KUBE_MOD" sigs.k8s.io/kwok)"
HELM_VERSION="$(modver "$KUBE_MOD" helm.sh/helm/v3)"
VGW_VERSION="$(modver "$OBJ_MOD" github.com/versity/versitygw)"
KUEUE_VERSION="$(modver "$KUEUE_MOD" sigs.k8s.io/kueue)"
for v in KUBE_VERSION ETCD_VERSION KWOK_VERSION HELM_VERSION VGW_VERSION KUEUE_VERSION; do
  [ -n "${!v}" ] || die "could not read $v from the wrapper go.mod files"
done

KUBE_DIR="${BIN}/kube-${KUBE_VERSION}"
ETCD_DIR="${BIN}/etcd-${ETCD_VERSION}"
KWOK_DIR="${BIN}/kwok-${KWOK_VERSION}"
HELM_DIR="${BIN}/helm-${HELM_VERSION}"
VGW_DIR="${BIN}/versitygw-${VGW_VERSION}"
KUEUE_DIR="${BIN}/kueue-${KUEUE_VERSION}"

# name  go package  destination
KUBE_TARGETS=(
  "kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver ${KUBE_DIR}"
  "kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager ${KUBE_DIR}"
  "kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler ${KUBE_DIR}"
  "kubectl k8s.io/kubernetes/cmd/kubectl ${KUBE_DIR}"
  "etcd go.etcd.io/etcd/server/v3 ${ETCD_DIR}"
  "kwok sigs.k8s.io/kwok/cmd/kwok ${KWOK_DIR}"
  "helm helm.sh/helm/v3/cmd/helm ${HELM_DIR}"
)
OBJ_TARGETS=(
  "versitygw github.com/versity/versitygw/cmd/versitygw ${VGW_DIR}"
)
KUEUE_TARGETS=(
  "kueue sigs.k8s.io/kueue/cmd/kueue ${KUEUE_DIR}"
)
KUEUE_MANIFESTS="${KUEUE_DIR}/manifests.yaml"

print_env_lines() {
  local t name pkg dir
  for t in "${KUBE_TARGETS[@]}" "${OBJ_TARGETS[@]}" "${KUEUE_TARGETS[@]}"; do
    read -r name pkg dir <<<"$t"
    printf '%s=%s\n' "$(echo "$name" | tr 'a-z-' 'A-Z_')" "${dir}/${name}"
  done
  printf 'KUEUE_MANIFESTS=%s\n' "$KUEUE_MANIFESTS"
  printf 'KUBE_VERSION=%s\nETCD_VERSION=%s\nKWOK_VERSION=%s\nHELM_VERSION=%s\nVERSITYGW_VERSION=%s\nKUEUE_VERSION=%s\n' \
    "$KUBE_VERSION" "$ETCD_VERSION" "$KWOK_VERSION" "$HELM_VERSION" "$VGW_VERSION" "$KUEUE_VERSION"
}

# Targets of a list whose binary is not in the cache yet.
missing() {
  local t name pkg dir
  for t in "$@"; do
    read -r name pkg dir <<<"$t"
    [ -x "${dir}/${name}" ] || echo "$t"
  done
}

# Kueue counts as missing until both its binary and its rendered manifests are there.
kueue_missing_now() { missing "${KUEUE_TARGETS[@]}"; [ -s "$KUEUE_MANIFESTS" ] || echo "manifests.yaml - ${KUEUE_DIR}"; }

mapfile -t kube_missing < <(missing "${KUBE_TARGETS[@]}")
mapfile -t obj_missing < <(missing "${OBJ_TARGETS[@]}")
mapfile -t kueue_missing < <(kueue_missing_now)

if [ "${#kube_missing[@]}" = 0 ] && [ "${#obj_missing[@]}" = 0 ] && [ "${#kueue_missing[@]}" = 0 ]; then
  say "reusing Kubernetes ${KUBE_VERSION}, etcd ${ETCD_VERSION}, KWOK ${KWOK_VERSION}, helm ${HELM_VERSION}, versitygw ${VGW_VERSION}, Kueue ${KUEUE_VERSION} from ${BIN}"
  if [ "$print_env" = 1 ]; then print_env_lines; fi
  exit 0
fi

if [ "$check" = 1 ]; then
  for t in "${kube_missing[@]}" "${obj_missing[@]}" "${kueue_missing[@]}"; do
    read -r name pkg dir <<<"$t"
    echo "cluster-bins: missing ${dir}/${name}" >&2
  done
  if [ "$print_env" = 1 ]; then print_env_lines; fi   # the paths the cache would hold
  exit 1
fi

# ---- building -------------------------------------------------------------------------------------
GO="${GO:-$(command -v go || true)}"
if [ -z "$GO" ] && [ -x /usr/local/go/bin/go ]; then GO=/usr/local/go/bin/go; fi
[ -n "$GO" ] || die "the Go toolchain is needed to build the test control plane (go >= $(awk '$1=="go"{print $2}' "$KUBE_MOD")); put it on PATH or set GO=/path/to/go"

mkdir -p "$BIN"
# One builder at a time (parallel pytest sessions, make and CI may all call this).
exec 9>"${BIN}/.lock"
if command -v flock >/dev/null; then
  say "taking the build lock ${BIN}/.lock (another build may hold it)"; flock 9
  mapfile -t kube_missing < <(missing "${KUBE_TARGETS[@]}")   # another process may have built them meanwhile
  mapfile -t obj_missing < <(missing "${OBJ_TARGETS[@]}")
  mapfile -t kueue_missing < <(kueue_missing_now)
fi

JOBS="${TINV_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
export GOFLAGS="-mod=readonly -buildvcs=false" GOWORK=off
export CGO_ENABLED="${CGO_ENABLED:-0}"
NICE=(); if command -v nice >/dev/null; then NICE=(nice -n 10); fi
say "using $("$GO" version) (GOPROXY=$("$GO" env GOPROXY)), ${JOBS} parallel jobs, cache ${BIN}"

# build MODULE_DIR LDFLAGS TARGET...  — one `go build` for all targets, then move each binary into its cache dir.
build() {
  local moddir="$1" ldflags="$2"; shift 2
  local out; out="$(mktemp -d "${BIN}/.build.XXXXXX")"
  local t name pkg dir pkgs=() start=$SECONDS
  for t in "$@"; do read -r name pkg dir <<<"$t"; pkgs+=("$pkg"); done
  say "go mod download in ${moddir#"$ROOT"/} ..."
  (cd "$moddir" && "${NICE[@]}" "$GO" mod download) || { rm -rf "$out"; die "go mod download failed in $moddir"; }
  say "downloaded modules in $((SECONDS - start)) s; building ${pkgs[*]} ..."
  local bstart=$SECONDS
  if ! (cd "$moddir" && "${NICE[@]}" "$GO" build -p "$JOBS" -trimpath -ldflags "$ldflags" -o "$out/" "${pkgs[@]}"); then
    rm -rf "$out"; die "go build failed in $moddir (command: cd $moddir && go build -trimpath -o OUT/ ${pkgs[*]})"
  fi
  for t in "$@"; do
    read -r name pkg dir <<<"$t"
    local built="$out/$(basename "$pkg")"
    if [[ "$pkg" =~ /v[0-9]+$ ]]; then built="$out/$(basename "$(dirname "$pkg")")"; fi   # go names .../server/v3 "server"
    [ -f "$built" ] || { rm -rf "$out"; die "expected $built after building $pkg"; }
    mkdir -p "$dir"
    mv -f "$built" "${dir}/${name}.tmp" && mv -f "${dir}/${name}.tmp" "${dir}/${name}"
    say "  ${dir}/${name}"
  done
  rm -rf "$out"
  say "built in $((SECONDS - bstart)) s (module download + build $((SECONDS - start)) s)"
}

total_start=$SECONDS
if [ "${#kube_missing[@]}" -gt 0 ]; then
  KMINOR="$(echo "$KUBE_VERSION" | cut -d. -f2)"
  V="$KUBE_VERSION"
  KLD="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    KLD+=" -X $p.gitVersion=$V -X $p.gitMajor=1 -X $p.gitMinor=$KMINOR -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  KLD+=" -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  say "building Kubernetes ${KUBE_VERSION} (apiserver, controller-manager, scheduler, kubectl), etcd ${ETCD_VERSION}, KWOK ${KWOK_VERSION}, helm ${HELM_VERSION}; a cold build takes 6-10 min on 2 cores"
  build "${ROOT}/hack/kube" "$KLD" "${kube_missing[@]}"
fi
if [ "${#obj_missing[@]}" -gt 0 ]; then
  say "building versitygw ${VGW_VERSION}; a cold build takes 1-2 min"
  build "${ROOT}/hack/objstore" \
    "-s -w -X main.Version=${VGW_VERSION} -X main.Build=tinv -X main.BuildTime=1970-01-01T00:00:00Z" \
    "${obj_missing[@]}"
fi
if [ "${#kueue_missing[@]}" -gt 0 ]; then
  mapfile -t kueue_bins < <(missing "${KUEUE_TARGETS[@]}")
  if [ "${#kueue_bins[@]}" -gt 0 ]; then
    say "building Kueue ${KUEUE_VERSION} (controller manager with all its job integrations); a cold build takes 4-8 min on 2 cores"
    build "${ROOT}/hack/kueue" \
      "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=${KUEUE_VERSION} -X sigs.k8s.io/kueue/pkg/version.GitCommit=${KUEUE_VERSION} -X sigs.k8s.io/kueue/pkg/version.BuildDate=1970-01-01T00:00:00Z" \
      "${kueue_bins[@]}"
  fi
  # The release's own install manifests, from the module source that `go mod download` fetched.
  (cd "${ROOT}/hack/kueue" && "$GO" mod download sigs.k8s.io/kueue) || die "could not download the sigs.k8s.io/kueue ${KUEUE_VERSION} module source"
  kueue_src="$(cd "${ROOT}/hack/kueue" && "$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
  [ -f "${kueue_src}/config/default/kustomization.yaml" ] || die "no config/default in the sigs.k8s.io/kueue module source (${kueue_src:-not found})"
  [ -x "${KUBE_DIR}/kubectl" ] || die "rendering Kueue's manifests needs ${KUBE_DIR}/kubectl"
  say "rendering Kueue's manifests: kubectl kustomize ${kueue_src}/config/default"
  mkdir -p "$KUEUE_DIR"
  "${KUBE_DIR}/kubectl" kustomize "${kueue_src}/config/default" > "${KUEUE_MANIFESTS}.tmp" \
    || { rm -f "${KUEUE_MANIFESTS}.tmp"; die "kubectl kustomize ${kueue_src}/config/default failed"; }
  mv -f "${KUEUE_MANIFESTS}.tmp" "$KUEUE_MANIFESTS"
  say "  ${KUEUE_MANIFESTS}"
fi
say "done in $((SECONDS - total_start)) s"
if [ "$print_env" = 1 ]; then print_env_lines; fi
