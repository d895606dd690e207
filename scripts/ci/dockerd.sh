#!/usr/bin/env bash
# Make sure a Docker engine runs on this machine and that the local base image exists.
#
# Idempotent: each step is skipped when its result is already there. Prints one line saying what it
# did (details go to /tmp/dockerd.log and /tmp/apt-docker.log); exits non-zero with a one-line reason
# on stderr when it cannot. Safe to run from any checkout path: it uses nothing from the checkout.
#
# No registry is reachable, so the base image is not pulled: it is `docker import`ed from a small
# root filesystem copied from this machine (shell, coreutils, shared libraries, a few /etc files).
# The tests bind-mount the Python interpreter, the venv and the checkout at their host paths, so the
# image only has to provide the shared libraries they link against.
#
# Environment: RUNHERD_BASE_IMAGE (default runherd-base:latest), DOCKERD_WAIT_SECONDS (default 60).
set -euo pipefail
# dockerd lives in /usr/sbin, which a CI shell may not have on its PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

IMAGE="${RUNHERD_BASE_IMAGE:-runherd-base:latest}"
WAIT_SECONDS="${DOCKERD_WAIT_SECONDS:-60}"
DOCKERD_LOG=/tmp/dockerd.log
APT_LOG=/tmp/apt-docker.log
# Bump when the recipe below changes, so an image built by an older recipe is rebuilt.
RECIPE_VERSION=1
LIBDIR="/usr/lib/$(uname -m)-linux-gnu"  # Debian multiarch
# Shared libraries bigger than this are skipped: the few that large (LLVM, ICU data, codecs) are
# never needed by a Python worker, and leaving them out halves the image.
MAX_LIB_SIZE=20M

START=$(date +%s)
did=()

fail() {
    echo "dockerd.sh: $*" >&2
    exit 1
}

engine_up() {
    docker info >/dev/null 2>&1
}

# Another apt/dpkg (e.g. a background `apt-get install docker.io` logging to $APT_LOG) may hold the
# dpkg lock; wait for it rather than failing, then let apt itself wait on the lock as well.
wait_for_apt() {
    local deadline=$(($(date +%s) + 300))
    # One name per pgrep: it refuses patterns longer than a process name (15 characters).
    while pgrep -x apt-get >/dev/null || pgrep -x apt >/dev/null || pgrep -x dpkg >/dev/null; do
        (($(date +%s) < deadline)) || fail "apt/dpkg still busy after 300 s (see $APT_LOG)"
        sleep 2
    done
}

install_docker() {
    wait_for_apt
    command -v dockerd >/dev/null 2>&1 && return 0 # the background install finished it
    {
        apt-get -o DPkg::Lock::Timeout=300 update
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y docker.io
    } >>"$APT_LOG" 2>&1 || fail "apt-get install docker.io failed (see $APT_LOG)"
    did+=("installed docker.io")
}

start_dockerd() {
    # A dockerd that is already starting (another run of this script) must not be doubled.
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
        did+=("started dockerd (pid $!)")
    else
        did+=("waited for a starting dockerd")
    fi
    local deadline=$(($(date +%s) + WAIT_SECONDS))
    until engine_up; do
        (($(date +%s) < deadline)) || fail "docker engine not up after ${WAIT_SECONDS} s (see $DOCKERD_LOG)"
        sleep 0.5
    done
}

image_current() {
    local v
    v=$(docker image inspect --format '{{ index .Config.Labels "runherd.base.recipe" }}' "$IMAGE" 2>/dev/null) || return 1
    [[ "$v" == "$RECIPE_VERSION" ]]
}

# Paths (relative to /) that make up the root filesystem, printed NUL-separated for tar.
rootfs_paths() {
    local p
    # Debian's merged /usr: /bin, /lib, /lib64 and /sbin are symlinks into /usr, kept as such.
    for p in bin sbin lib lib64; do
        [[ -e "/$p" || -L "/$p" ]] && printf '%s\0' "$p"
    done
    printf '%s\0' usr/lib64
    # The tools a worker command or a test may use; the whole /usr/bin would be 600 MB.
    for p in sh dash bash env cat echo true false sleep ls kill ps head tail id uname date printf \
        seq mkdir rm cp mv ln touch grep sed tr wc sort chmod basename dirname stat timeout; do
        [[ -e "/usr/bin/$p" ]] && printf '%s\0' "usr/bin/$p"
    done
    # Shared libraries (files and their version symlinks) at the top of the multiarch directory,
    # plus the OpenSSL engines/providers Python's ssl module may load.
    (cd / && find "${LIBDIR#/}" -maxdepth 1 -name '*.so*' \( -type l -o -size "-$MAX_LIB_SIZE" \) -print0)
    for p in "$LIBDIR/ossl-modules" "$LIBDIR/engines-3"; do
        [[ -d "$p" ]] && printf '%s\0' "${p#/}"
    done
    for p in etc/passwd etc/group etc/nsswitch.conf etc/ld.so.cache etc/ld.so.conf etc/ld.so.conf.d \
        etc/ssl etc/ca-certificates.conf usr/share/ca-certificates etc/localtime usr/share/zoneinfo/UTC; do
        [[ -e "/$p" ]] && printf '%s\0' "$p"
    done
}

build_image() {
    local tmp
    tmp=$(mktemp -d)
    # Empty directories the container expects; /tmp must be world-writable with the sticky bit.
    mkdir -p "$tmp/rootfs/tmp" "$tmp/rootfs/proc" "$tmp/rootfs/sys" "$tmp/rootfs/dev" \
        "$tmp/rootfs/root" "$tmp/rootfs/work" "$tmp/rootfs/var/tmp" "$tmp/rootfs/run"
    chmod 1777 "$tmp/rootfs/tmp" "$tmp/rootfs/var/tmp"
    # One tarball: the host paths, then the empty directories appended. tar exits 1 when a file
    # changed while it was read (a library being upgraded): harmless here.
    local rc=0
    rootfs_paths | tar -C / --null -T - -cf "$tmp/rootfs.tar" 2>>"$DOCKERD_LOG" || rc=$?
    ((rc <= 1)) || fail "tar of the root filesystem failed (see $DOCKERD_LOG)"
    tar -C "$tmp/rootfs" -rf "$tmp/rootfs.tar" . || fail "tar of the empty directories failed"
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/sh"]' \
        --change "LABEL runherd.base.recipe=$RECIPE_VERSION" \
        --message "runherd base image: root filesystem copied from $(hostname)" \
        "$tmp/rootfs.tar" "$IMAGE" >>"$DOCKERD_LOG" 2>&1 || {
        rm -rf "$tmp"
        fail "docker import of $IMAGE failed (see $DOCKERD_LOG)"
    }
    local size
    size=$(du -m "$tmp/rootfs.tar" | cut -f1)
    rm -rf "$tmp"
    # The image must be able to run a shell: catch a broken recipe here, not in the tests.
    docker run --rm "$IMAGE" /bin/sh -c 'true' >>"$DOCKERD_LOG" 2>&1 ||
        fail "built $IMAGE but it cannot run /bin/sh (see $DOCKERD_LOG)"
    did+=("built $IMAGE from a ${size} MB root filesystem")
}

main() {
    if ! engine_up; then
        command -v dockerd >/dev/null 2>&1 || install_docker
        start_dockerd
    else
        did+=("engine already running")
    fi
    if image_current; then
        did+=("$IMAGE present")
    else
        build_image
    fi
    local line
    line=$(printf '%s; ' "${did[@]}")
    echo "dockerd.sh: ${line%; } ($(($(date +%s) - START)) s)"
}

main "$@"
