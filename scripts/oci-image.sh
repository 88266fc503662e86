#!/usr/bin/env bash
# Builds an OCI image archive (oci-layout, one uncompressed layer) from files on this machine,
# without a registry or a container daemon. Every binary brings the shared libraries `ldd` names
# (at the same paths), so a dynamically linked release build runs as it does here.
#
#   scripts/oci-image.sh --name ghcr.io/agntcy/slim-operator:0.1.0 --out slim-operator.oci.tar \
#       --entrypoint /slim-operator --cmd run  target/release/slim-operator=/slim-operator
#
# Arguments after the options are SOURCE[=TARGET] (TARGET defaults to SOURCE; a directory is copied
# whole, less what --exclude PATTERN names, as tar's --exclude). --entrypoint, --cmd, --env and
# --exclude may repeat (one argv word each). Import and use:
#
#   ctr -n k8s.io images import slim-operator.oci.tar      # containerd, the node's CRI namespace
#   docker load < slim-operator.oci.tar  /  podman load -i slim-operator.oci.tar
#   (then imagePullPolicy: IfNotPresent or Never)
#
# The archive is reproducible: the same inputs give the same digests.
set -euo pipefail

name="" out="" user="" entrypoint=() cmd=() files=() env=() excludes=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --entrypoint) entrypoint+=("$2"); shift 2 ;;
    --cmd) cmd+=("$2"); shift 2 ;;
    --user) user=$2; shift 2 ;;
    --env) env+=("$2"); shift 2 ;;
    --exclude) excludes+=("--exclude=$2"); shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    --*) echo "oci-image: unknown option $1" >&2; exit 2 ;;
    *) files+=("$1"); shift ;;
  esac
done
if [ -z "$name" ] || [ -z "$out" ] || [ ${#files[@]} = 0 ]; then
  echo "usage: oci-image.sh --name IMAGE:TAG --out FILE [--entrypoint ARG]... [--cmd ARG]... [--user UID[:GID]] [--env K=V]... SOURCE[=TARGET]..." >&2
  exit 2
fi
for tool in ldd sha256sum tar python3; do
  command -v "$tool" >/dev/null || { echo "oci-image: $tool is needed" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"

copy() { # SOURCE TARGET: the file (or tree) and, for ELF files, the libraries it links
  local source=$1 target=$2
  if [ ! -e "$source" ]; then echo "oci-image: $source does not exist" >&2; exit 1; fi
  mkdir -p "$root$(dirname "$target")"
  if [ -d "$source" ]; then
    mkdir -p "$root$target"
    tar -C "$source" "${excludes[@]}" -cf - . | tar -C "$root$target" -xf -
  else
    cp --dereference "$source" "$root$target"
  fi
  local file
  while IFS= read -r file; do
    if head -c 4 "$file" 2>/dev/null | grep -q 'ELF'; then
      { ldd "$file" 2>/dev/null || true; } | { grep -o '/[^ ]*' || true; } | while IFS= read -r lib; do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp --dereference "$lib" "$root$lib"
      done
    fi
  done < <(find "$root$target" -type f)
}
for spec in "${files[@]}"; do
  source=${spec%%=*}
  target=${spec#*=}
  [ "$target" = "$spec" ] && target=$(realpath -s "$source")
  copy "$source" "$target"
done
# A user and group table for the nonroot IDs Kubernetes charts use (65532, distroless' nonroot).
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"

mkdir -p "$work/oci/blobs/sha256"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$work/layer.tar" .

python3 - "$work" "$name" "$user" "${#entrypoint[@]}" "${entrypoint[@]}" "${#cmd[@]}" "${cmd[@]}" "${#env[@]}" "${env[@]}" <<'PY'
import hashlib, json, os, shutil, sys
work, name, user = sys.argv[1], sys.argv[2], sys.argv[3]
rest = sys.argv[4:]
def take(rest):
    n = int(rest[0]); return rest[1:1 + n], rest[1 + n:]
entrypoint, rest = take(rest)
cmd, rest = take(rest)
env, rest = take(rest)
blobs = os.path.join(work, "oci", "blobs", "sha256")
def blob(data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}
h = hashlib.sha256()
with open(os.path.join(work, "layer.tar"), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
layer_digest = h.hexdigest()
shutil.move(os.path.join(work, "layer.tar"), os.path.join(blobs, layer_digest))
layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + layer_digest,
         "size": os.path.getsize(os.path.join(blobs, layer_digest))}
config = {"architecture": "amd64", "os": "linux",
          "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"] + env},
          "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}
if entrypoint: config["config"]["Entrypoint"] = entrypoint
if cmd: config["config"]["Cmd"] = cmd
if user: config["config"]["User"] = user
dump = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":")).encode()
config_desc = dict(mediaType="application/vnd.oci.image.config.v1+json", **blob(dump(config)))
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc, "layers": [layer]}
manifest_desc = dict(mediaType="application/vnd.oci.image.manifest.v1+json", **blob(dump(manifest)))
manifest_desc["annotations"] = {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}
with open(os.path.join(work, "oci", "index.json"), "wb") as f:
    f.write(dump({"schemaVersion": 2, "manifests": [manifest_desc]}))
with open(os.path.join(work, "oci", "oci-layout"), "wb") as f:
    f.write(dump({"imageLayoutVersion": "1.0.0"}))
print(manifest_desc["digest"])
PY
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/oci" -cf "$out.tmp" .
mv "$out.tmp" "$out"
