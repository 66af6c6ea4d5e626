#!/usr/bin/env bash
# Builds Dockerfile.sidecar, unchanged, with podman and checks the image against a real PostgreSQL.
#
#   scripts/image.sh           build (base images cached), run the image, check it, PASS/FAIL summary
#   scripts/image.sh --rmi     the same, then remove the built image and its build cache
#   scripts/image.sh --purge   remove everything this script keeps (base images, caches) and exit
#
# A release check, too slow for scripts/test.sh: on a busy 2-core machine a cold run took 26
# minutes, a warm one 10 after a source edit and 36 s with nothing changed (docs/deploy.md).
# Run it as root on Debian bookworm; it installs podman, runc, slirp4netns, debootstrap and curl
# from Debian's packages when missing.
#
# No container registry is needed: the two base images the Dockerfile names are made here and
# imported under exactly those names, into a podman storage of this script's own
# (PGSIDECAR_IMAGE_CACHE, default /var/cache/pgsidecar-image), so they never shadow the real
# images of the machine's own podman or docker:
#   rust:1-bookworm                        Debian bookworm (debootstrap) + gcc + the host's Rust
#                                          toolchain (rustup's, >= 1.85 for edition 2024)
#   gcr.io/distroless/cc-debian12:nonroot  glibc, libgcc, libstdc++, libgomp, libssl3, tzdata,
#                                          CA certificates, user nonroot (65532); no shell, no
#                                          package manager, like Google's distroless cc
# Both are kept between runs and made again when the host's Rust version or this recipe changes.
# The build gets its crates from the host's cargo registry (`cargo fetch --locked` first) and
# runs without a network.
#
# The checks: the image's user (numeric), HEALTHCHECK and STOPSIGNAL as written; no shell in
# it; the sidecar runs as uid 65532 and is PID 1, read-only and without capabilities; /ready
# answers 200 through the published ops port; the HEALTHCHECK command (`pgsidecar probe live`)
# passes in the running container; on SIGTERM (`podman stop`) /ready turns 503 at once and the
# process exits 0 within drain + grace + 5 s, logging "pgsidecar stopped". Then the Compose
# example of docs/deploy.md runs with podman-compose, and scripts/deploy-check.sh checks the
# other snippets there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Bump when the base images' recipe below changes, so cached ones are made again.
RECIPE=1
CACHE=${PGSIDECAR_IMAGE_CACHE:-/var/cache/pgsidecar-image}
RUNDIR=/run/pgsidecar-image
IMAGE=localhost/pgsidecar:check
RUST_BASE=rust:1-bookworm
RUNTIME_BASE=gcr.io/distroless/cc-debian12:nonroot
MIRROR=${PGSIDECAR_IMAGE_MIRROR:-http://deb.debian.org/debian}
# The sidecar's worst case from SIGTERM to exit is drain + grace + ~5 s (config/default.toml).
shutdown_key() { awk -F' *= *' -v k="$1" '/^\[/ {s = ($0 == "[shutdown]")} s && $1 == k {print $2}' config/default.toml; }
DRAIN=$(shutdown_key drain_seconds)
GRACE=$(shutdown_key grace_seconds)

say() { echo "image.sh: $*" >&2; }
die() { say "$*"; exit 1; }

rmi=""
case "${1:-}" in
  "") ;;
  --rmi) rmi=1 ;;
  --purge) purge=1 ;;
  *) die "usage: scripts/image.sh [--rmi | --purge]" ;;
esac

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and rootful podman need it)"

# --- podman, configured for these machines, with a storage of its own -------------------------
need=()
for tool in podman:podman runc:runc slirp4netns:slirp4netns debootstrap:debootstrap curl:curl \
  iptables:iptables; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
# Podman's default bridge network (CNI), for anything run without --network.
[ -e /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
# The venvs for podman-compose and scripts/deploy-check.sh.
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >&2
fi

mkdir -p "$CACHE" "$RUNDIR"
cat >"$CACHE/containers.conf" <<'EOF'
[containers]
# Podman raises the open-files limit to 1048576 by default; the sandbox of the project's
# machines refuses that ("error setting rlimit type 7"): inherit the host's limit instead.
default_ulimits = []

[engine]
# Debian's podman takes crun or runc; runc is the one installed here.
runtime = "runc"
# No systemd as PID 1 on the project's machines: podman manages cgroups itself.
cgroup_manager = "cgroupfs"
EOF
echo "tmp_dir = \"$RUNDIR/libpod\"" >>"$CACHE/containers.conf"
cat >"$CACHE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$RUNDIR/storage"
EOF
export CONTAINERS_CONF="$CACHE/containers.conf" CONTAINERS_STORAGE_CONF="$CACHE/storage.conf"

# One run at a time per cache.
exec 9>"$CACHE/lock"
flock -n 9 || { say "another scripts/image.sh is running (waiting for it)"; flock 9; }

if [ -n "${purge:-}" ]; then
  # Not `podman system reset`: that would also delete the machine's podman networks.
  podman rm -a -f -t 0 >/dev/null 2>&1 || true
  podman rmi -a -f >/dev/null 2>&1 || true
  rm -rf "${CACHE:?}"/* "$RUNDIR"
  say "removed $CACHE and $RUNDIR"
  exit 0
fi

label() { podman image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }
now() { date +%s; }
t_start=$(now)

# --- base images ----------------------------------------------------------------------------
command -v rustc >/dev/null 2>&1 || die "no Rust toolchain on the host (rustup); the build image copies the host's"
sysroot=$(rustc --print sysroot)
rust_version=$(rustc --version | awk '{print $2}')
[ -x "$sysroot/bin/cargo" ] || die "no cargo in $sysroot (a rustup toolchain has both)"
toolchain=$(basename "$sysroot")
# Edition 2024 needs Rust 1.85.
printf '1.85.0\n%s\n' "${rust_version%%-*}" | sort -V -C || die "Rust $rust_version on the host; the crate needs 1.85 or newer"
want="$RECIPE-$(rustc -vV | md5sum | cut -c1-16)"
have=$(label "$RUST_BASE" org.pgsidecar.base)
have_runtime=$(label "$RUNTIME_BASE" org.pgsidecar.base)

if [ "$have" != "$want" ] || [ "$have_runtime" != "$RECIPE" ]; then
  say "making the base images $RUST_BASE and $RUNTIME_BASE (debootstrap: about a minute)"
  root="$CACHE/rootfs"
  rm -rf "$root" "$CACHE/distroless"
  mkdir -p "$CACHE/debs"
  # gcc and libc6-dev: the linker and C library the crates need (mimalloc builds C). The rest are
  # installed only so their packages can be copied into the runtime image below.
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
    --include=ca-certificates,gcc,libc6-dev,libssl3,libgomp1,libstdc++6,tzdata,netbase \
    bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }

  # The runtime image: the files of a few packages, as distroless does it.
  d="$CACHE/distroless"
  mkdir -p "$d/usr/bin" "$d/usr/sbin" "$d/usr/lib" "$d/usr/lib64"
  for dir in bin sbin lib lib64; do ln -s "usr/$dir" "$d/$dir"; done
  pkgs="base-files netbase tzdata libc6 libgcc-s1 libgomp1 libstdc++6 libssl3"
  # shellcheck disable=SC2086
  chroot "$root" dpkg -L $pkgs | sort -u | sed 's|^/||' | grep -v -E '^(\.|)$' \
    | grep -v -E '^(usr/)?(s?bin)/|^usr/share/(doc|man|info|lintian|common-licenses|base-files|bug)/' \
    >"$CACHE/distroless.files"
  # Keep a copyright file per package, as distroless does.
  # shellcheck disable=SC2086
  for p in $pkgs; do echo "usr/share/doc/$p/copyright"; done >>"$CACHE/distroless.files"
  tar -C "$root" -c --no-recursion -T "$CACHE/distroless.files" 2>/dev/null \
    | tar -C "$d" -x --keep-directory-symlink
  mkdir -p "$d/var/lib/dpkg/status.d" "$d/etc/ssl/certs" "$d/home/nonroot" "$d/root" "$d/tmp"
  # Package records for image scanners, in distroless's layout.
  for p in $pkgs; do chroot "$root" dpkg-query -s "$p" >"$d/var/lib/dpkg/status.d/$p"; done
  cp "$root/etc/ssl/certs/ca-certificates.crt" "$d/etc/ssl/certs/"
  cat >"$d/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$d/etc/group" <<'EOF'
root:x:0:
tty:x:5:
staff:x:50:
nobody:x:65534:
nonroot:x:65532:
EOF
  printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n' >"$d/etc/nsswitch.conf"
  chown 65532:65532 "$d/home/nonroot"
  chmod 0700 "$d/home/nonroot" "$d/root"
  chmod 1777 "$d/tmp"
  [ ! -e "$d/bin/sh" ] || die "the runtime image would have a shell"
  podman rmi -f "$RUNTIME_BASE" >/dev/null 2>&1 || true
  tar -C "$d" -c . | podman import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'USER 65532' --change 'WORKDIR /home/nonroot' \
    --change "LABEL org.pgsidecar.base=$RECIPE" \
    - "$RUNTIME_BASE" >/dev/null

  # The build image: the same system with the host's Rust toolchain where rustup puts it in
  # the official rust image (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo).
  rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
  mkdir -p "$root/usr/local/rustup/toolchains/$toolchain" "$root/usr/local/cargo/bin"
  tar -C "$sysroot" -c --exclude=./share/doc . | tar -C "$root/usr/local/rustup/toolchains/$toolchain" -x
  for b in "$root/usr/local/rustup/toolchains/$toolchain/bin/"*; do
    ln -s "/usr/local/rustup/toolchains/$toolchain/bin/$(basename "$b")" "$root/usr/local/cargo/bin/"
  done
  podman rmi -f "$RUST_BASE" >/dev/null 2>&1 || true
  tar -C "$root" -c . | podman import -q \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "ENV RUST_VERSION=$rust_version" --change 'CMD ["bash"]' \
    --change "LABEL org.pgsidecar.base=$want" \
    - "$RUST_BASE" >/dev/null
  rm -rf "$root" "$d"
  # The Dockerfile's short name must resolve to the local image, never to a registry.
  podman tag "$RUST_BASE" "docker.io/library/$RUST_BASE"
  # Build layers on the old base images are of no use any more.
  podman image prune -f >/dev/null
else
  say "base images cached ($RUST_BASE with Rust $rust_version, $RUNTIME_BASE)"
fi
t_base=$(now)

# --- the build -----------------------------------------------------------------------------
# --format docker: the OCI format has no HEALTHCHECK, and podman would drop it (docker build
# always keeps it). --pull=never: the base images are the local ones.
# Crates: the build container cannot fetch them here (the machines' egress re-signs TLS with a CA
# only the host trusts), so it gets the host's cargo registry, filled by `cargo fetch`, and builds
# offline without a network. Both are build options: the Dockerfile stays as it is.
cargo fetch --locked --quiet
printf '[net]\noffline = true\n' >"$CACHE/cargo-offline.toml"
build=(podman build --pull=never --format docker --layers --network none
  --volume "${CARGO_HOME:-$HOME/.cargo}/registry:/usr/local/cargo/registry:ro"
  --volume "$CACHE/cargo-offline.toml:/usr/local/cargo/config.toml:ro"
  -f Dockerfile.sidecar)
say "building $IMAGE from Dockerfile.sidecar (a release build: minutes; the dependencies stay cached until Cargo.toml or Cargo.lock change)"
# The build stage gets a tag of its own, so that pruning what older builds left behind (a few GB
# each time Cargo.lock changes) keeps the current layer cache.
"${build[@]}" --target build -t localhost/pgsidecar:build-cache . >&2 || die "podman build failed"
"${build[@]}" -t "$IMAGE" . >&2 || die "podman build failed"
podman image prune -f >/dev/null
t_build=$(now)

# --- run it against a real PostgreSQL --------------------------------------------------------
results=()
failed=0
check() { # check NAME COMMAND...: records PASS or FAIL
  local name=$1
  shift
  if "$@"; then results+=("PASS  $name"); else results+=("FAIL  $name"); failed=1; fi
}

free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
  die "no free port found"
}

ctr="pgsidecar-image-check-$$"
project="pgsidecar-image-compose-$$"
pg_port=${PGSIDECAR_IMAGE_PG_PORT:-$(free_port)}
cleanup() {
  podman rm -f -t 0 "$ctr" >/dev/null 2>&1 || true
  podman ps -a -q --filter "label=com.docker.compose.project=$project" | xargs -r podman rm -f -t 0 >/dev/null 2>&1 || true
  scripts/pg.sh stop .pgdata/image
  if [ -n "$rmi" ]; then
    podman rmi -f "$IMAGE" localhost/pgsidecar:build-cache >/dev/null 2>&1 || true
    podman image prune -f >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
PG_PORT_HINT="set PGSIDECAR_IMAGE_PG_PORT to a free port" scripts/pg.sh start .pgdata/image "$pg_port"

# The image as written.
inspect() { podman image inspect --format "$1" "$IMAGE"; }
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
check "image user is 65532:65532 (nonroot)" test "$(inspect '{{.Config.User}}')" = 65532:65532
check "image HEALTHCHECK is 'pgsidecar probe live'" \
  test "$(inspect '{{json .Config.Healthcheck.Test}}')" = '["CMD","/usr/local/bin/pgsidecar","probe","live"]'
check "image STOPSIGNAL is SIGTERM" test "$(inspect '{{.Config.StopSignal}}')" = SIGTERM
check "image has no shell" bash -c "! podman run --rm --network none --entrypoint /bin/sh '$IMAGE' -c true >/dev/null 2>&1"
check "config/default.toml is in the image" bash -c \
  "podman run --rm --network none '$IMAGE' --config /etc/pgsidecar/default.toml check-config >/dev/null"

# slirp4netns with allow_host_loopback: the container reaches the host's 127.0.0.1 (PostgreSQL
# from scripts/pg.sh listens only there) as 10.0.2.2, and -p publishes the ops port.
# --health-interval=disable: podman runs periodic checks from systemd timers, which these
# machines lack; `podman healthcheck run` below runs the image's check on demand instead.
# --read-only, --cap-drop=ALL, no-new-privileges: what docs/deploy.md's securityContext asks.
podman run -d --name "$ctr" --network slirp4netns:allow_host_loopback=true \
  -p 127.0.0.1::7071 --health-interval=disable \
  --read-only --cap-drop=ALL --security-opt=no-new-privileges \
  -e "DATABASE_URL=postgres://postgres@10.0.2.2:$pg_port/postgres" "$IMAGE" >/dev/null
ops=$(podman port "$ctr" 7071/tcp | head -n 1)
say "container $ctr: ops API on $ops, PostgreSQL on host port $pg_port"

status() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$ops$1" || true; }
ready_200() {
  for _ in $(seq 1 120); do
    [ "$(status /ready)" = 200 ] && return 0
    sleep 0.5
  done
  return 1
}
check "/ready answers 200 through the published ops port" ready_200
check "/health reports postgres pass" bash -c \
  "curl -s --max-time 2 'http://$ops/health' | grep -q '\"postgres:responseTime\":\[{[^]]*\"status\":\"pass\"'"
check "/metrics serves pgsidecar_build_info" bash -c \
  "curl -s --max-time 2 'http://$ops/metrics' | grep -q '^pgsidecar_build_info'"
check "HEALTHCHECK passes (podman healthcheck run)" bash -c \
  "podman healthcheck run '$ctr' >/dev/null 2>&1"
check "'pgsidecar probe ready' passes in the container" bash -c \
  "podman exec '$ctr' /usr/local/bin/pgsidecar probe ready >/dev/null"

pid=$(podman inspect --format '{{.State.Pid}}' "$ctr")
check "the sidecar runs as uid 65532" bash -c "grep -q -E '^Uid:\s+65532\s' /proc/$pid/status"
check "the sidecar is PID 1 in its container" bash -c "grep -q -E '^NSpid:.*\s1$' /proc/$pid/status"

# SIGTERM as a container engine sends it: podman stop (the image's STOPSIGNAL), with a timeout
# longer than the worst case so a slow stop shows as a late exit rather than a SIGKILL.
t0=$(date +%s.%N)
podman stop -t $((DRAIN + GRACE + 15)) "$ctr" >/dev/null &
stopper=$!
drain_503() {
  for _ in $(seq 1 40); do
    [ "$(status /ready)" = 503 ] && return 0
    sleep 0.1
  done
  return 1
}
check "/ready turns 503 at once on SIGTERM (drain)" drain_503
wait "$stopper" || true
t1=$(date +%s.%N)
stop_s=$(awk "BEGIN{printf \"%.1f\", $t1 - $t0}")
code=$(podman inspect --format '{{.State.ExitCode}}' "$ctr")
check "exit code 0 on SIGTERM (was $code)" test "$code" = 0
check "stopped within drain + grace + 5 s = $((DRAIN + GRACE + 5)) s (took ${stop_s%.*} s)" \
  awk "BEGIN{exit !($stop_s < $DRAIN + $GRACE + 5)}"
check "log line 'pgsidecar stopped'" bash -c "podman logs '$ctr' 2>&1 | grep -q '\"message\":\"pgsidecar stopped\"'"
# --- the Compose example of docs/deploy.md, run with podman-compose --------------------------
# As printed but for what this machine needs: the image names (ours; the rust base image, which
# has bash, as a stand-in app that sleeps), a free published port instead of 3000 and 7071, and
# the sidecar's network (slirp4netns, to reach the host's PostgreSQL). Podman 4.3 is too old for
# podman-compose to wait for `condition: service_healthy`; the stand-in app does not mind.
venv="$CACHE/venv"
compose_pins="podman-compose==1.6.0 PyYAML==6.0.3"
if [ "$(cat "$venv/pins" 2>/dev/null)" != "$compose_pins" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $compose_pins
  echo "$compose_pins" >"$venv/pins"
fi
awk '$0 == "<!-- checked: compose -->" {f = 1; next} f && /^```yaml/ {p = 1; next} p && /^```/ {exit} p' \
  docs/deploy.md >"$CACHE/compose.printed.yaml"
"$venv/bin/python" - "$CACHE/compose.printed.yaml" "$CACHE/compose.yaml" "$IMAGE" "$RUST_BASE" <<'EOF'
import sys, yaml
src, dst, image, app_image = sys.argv[1:]
c = yaml.safe_load(open(src))
side, app = c["services"]["pgsidecar"], c["services"]["app"]
side["image"] = image
side["ports"] = ["127.0.0.1::7071"]
side["network_mode"] = "slirp4netns:allow_host_loopback=true"
app["image"] = app_image
app["command"] = ["sleep", "infinity"]
yaml.safe_dump(c, open(dst, "w"), sort_keys=False)
EOF
compose() {
  DATABASE_URL="postgres://postgres@10.0.2.2:$pg_port/postgres" \
    "$venv/bin/podman-compose" -p "$project" -f "$CACHE/compose.yaml" "$@"
}
by_service() {
  podman ps -a --filter "label=com.docker.compose.project=$project" \
    --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n 1
}
# The stand-in app writes a cache entry and reads it back over its own loopback.
app_uses_sidecar() {
  # shellcheck disable=SC2016
  podman exec "$c_app" bash -c '
    put() { printf "PUT /v1/cache/compose HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n\"hello\"" >&3; cat <&3; }
    get() { printf "GET /v1/cache/compose HTTP/1.0\r\n\r\n" >&3; cat <&3; }
    put 3<>/dev/tcp/127.0.0.1/7070 >/dev/null && get 3<>/dev/tcp/127.0.0.1/7070' | grep -q '^"hello"'
}
compose up -d >"$CACHE/compose.log" 2>&1 || true
c_side=$(by_service pgsidecar)
c_app=$(by_service app)
if [ -n "$c_side" ] && [ -n "$c_app" ]; then
  ops=$(podman port "$c_side" 7071/tcp | head -n 1)
  check "Compose: /ready answers 200 through the published ops port" ready_200
  check "Compose: the app reaches the sidecar on its own 127.0.0.1:7070" app_uses_sidecar
  check "Compose: the health check passes" bash -c "podman healthcheck run '$c_side' >/dev/null 2>&1"
  check "Compose: the sidecar's root file system is read-only" \
    test "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$c_side")" = true
  podman wait "$c_side" >"$CACHE/compose.exit" 2>/dev/null &
  waiter=$!
  compose down >>"$CACHE/compose.log" 2>&1 || true
  wait "$waiter" || true
  check "Compose: down stops the sidecar with exit code 0" test "$(cat "$CACHE/compose.exit")" = 0
else
  cat "$CACHE/compose.log" >&2
  results+=("FAIL  Compose: the services did not start")
  failed=1
fi
compose down -t 0 >/dev/null 2>&1 || true

check "docs/deploy.md snippets (scripts/deploy-check.sh)" bash -c "scripts/deploy-check.sh >&2"
t_end=$(now)

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo
echo "scripts/image.sh: $IMAGE ($((size / 1000000)) MB)"
printf '  %s\n' "${results[@]}"
echo "  time: base images $((t_base - t_start)) s, build $((t_build - t_base)) s, checks $((t_end - t_build)) s, total $((t_end - t_start)) s"
if [ "$failed" -ne 0 ]; then
  echo "scripts/image.sh: FAIL"
  podman logs "$ctr" 2>&1 | tail -n 20 >&2 || true
  exit 1
fi
echo "scripts/image.sh: PASS"
[ -n "$rmi" ] || echo "  the image stays in $CACHE/storage: CONTAINERS_STORAGE_CONF=$CACHE/storage.conf podman images"
