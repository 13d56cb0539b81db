# shellcheck shell=bash
# Shared by vm-images/install-deps, vm-images/build and vm-images/run-tests
# (bash, sourced). Paths, messages, and the two ways packages are fetched:
#
#  - bookworm-backports (kernel, qemu, firmware): through a PRIVATE apt
#    configuration under build/apt/ — its own sources.list, lists, cache and
#    an empty dpkg status file — so the machine's apt sources are never
#    touched. Its one source line reuses the machine's Debian mirror.
#  - the machine's own suite (busybox-static, nbd-client, ...): the
#    machine's apt, `apt-get download` only (nothing is installed).

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$VM_DIR/.." && pwd)
B=$VM_DIR/build
APT_DIR=$B/apt
DEBS=$B/debs
QEMU_DIR=$B/qemu
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
BPO_SUITE=bookworm-backports
# The kernel: the backports metapackage, resolved to the real versioned package.
KERNEL_META=linux-image-cloud-amd64
QEMU_PKGS=(qemu-system-x86 qemu-system-data seabios)

say() { printf '%s: %s\n' "${SELF:-vm-images}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${SELF:-vm-images}" "$*" >&2; exit 1; }

# The URI of the machine's Debian mirror: the URIs: line of the deb822
# stanza whose Suites: has "bookworm", else the first `deb URI bookworm`
# line of /etc/apt/sources.list.
mirror_uri() {
  local f=/etc/apt/sources.list.d/debian.sources uri=
  if [ -r "$f" ]; then
    uri=$(awk '
      function flush() { if (has && uri != "" && !done) { print uri; done = 1 } has = 0; uri = "" }
      /^[[:space:]]*$/ { flush(); next }
      /^[[:space:]]*#/ { next }
      tolower($1) == "uris:"   { uri = $2 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") has = 1 }
      END { flush() }' "$f")
  fi
  if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" {
        i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        if ($(i + 1) == "bookworm") { print $i; exit } }' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || die "no bookworm mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
  printf '%s\n' "$uri"
}

# apt options of the private backports configuration.
bpo_opts() {
  BPO_OPTS=(
    -o "Dir::Etc::sourcelist=$APT_DIR/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::Etc::preferences=$APT_DIR/preferences"
    -o "Dir::Etc::preferencesparts=$APT_DIR/preferences.d"
    -o "Dir::State=$APT_DIR/state"
    -o "Dir::State::status=$APT_DIR/status"
    -o "Dir::Cache=$APT_DIR/cache"
    -o "APT::Architecture=amd64"
    -o "APT::Architectures::=amd64"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
    -q
  )
}

# Set up the private configuration; `apt-get update` it when its lists are
# missing, older than a day, or $1 = force.
bpo_init() {
  bpo_opts
  mkdir -p "$APT_DIR/state/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/preferences.d"
  : >"$APT_DIR/preferences"
  [ -e "$APT_DIR/status" ] || : >"$APT_DIR/status"
  [ -r "$KEYRING" ] || die "$KEYRING missing (apt-get install debian-archive-keyring)"
  local line
  line="deb [signed-by=$KEYRING] $(mirror_uri) $BPO_SUITE main"
  if [ "$(cat "$APT_DIR/sources.list" 2>/dev/null)" != "$line" ]; then
    printf '%s\n' "$line" >"$APT_DIR/sources.list"
    rm -f "$APT_DIR"/state/lists/*_Packages* "$APT_DIR/updated"
  fi
  if [ "${1:-}" = force ] || [ -z "$(find "$APT_DIR/updated" -mmin -1440 2>/dev/null)" ]; then
    say "apt-get update (private $BPO_SUITE configuration in ${APT_DIR#"$ROOT"/})"
    if apt-get "${BPO_OPTS[@]}" update >"$APT_DIR/update.log" 2>&1; then
      touch "$APT_DIR/updated"
    elif ls "$APT_DIR"/state/lists/*_Packages* >/dev/null 2>&1; then
      say "warning: apt-get update of $BPO_SUITE failed; going on with the lists at hand"
    else
      cat "$APT_DIR/update.log" >&2
      die "apt-get update of $BPO_SUITE failed"
    fi
  fi
}

bpo_apt_get() { bpo_opts; apt-get "${BPO_OPTS[@]}" "$@"; }
bpo_apt_cache() { bpo_opts; apt-cache "${BPO_OPTS[@]}" "$@"; }

# The versioned kernel package the metapackage depends on.
bpo_kernel_pkg() {
  local p
  p=$(bpo_apt_cache depends "$KERNEL_META" | sed -n 's/^ *Depends: \(linux-image-6\.12\.[^ ]*-cloud-amd64\)$/\1/p' | head -n1)
  [ -n "$p" ] || die "$KERNEL_META in $BPO_SUITE does not depend on a linux-image-6.12.*-cloud-amd64 package"
  printf '%s\n' "$p"
}

# Download packages into $DEBS/$1 with the given apt-get function; a .deb
# already there (same file name, i.e. same version) is kept. Prints the
# paths of the .deb files, one a line.
_download() {
  local getter=$1 dir=$2; shift 2
  mkdir -p "$dir"
  local uris
  uris=$($getter download --print-uris "$@" 2>"$dir/download.err") ||
    { cat "$dir/download.err" >&2; return 1; }
  local need=() pkg f
  for pkg in "$@"; do
    f=$(printf '%s\n' "$uris" | awk -v p="$pkg" '{ n = $2; sub(/_.*/, "", n); if (n == p) { print $2; exit } }')
    [ -n "$f" ] || { say "apt-get download --print-uris did not name a file for $pkg"; return 1; }
    [ -s "$dir/$f" ] || need+=("$pkg")
    printf '%s\n' "$dir/$f"
  done
  if [ ${#need[@]} -gt 0 ]; then
    say "downloading ${need[*]}"
    (cd "$dir" && $getter download "${need[@]}" >"$dir/download.log" 2>&1) ||
      { cat "$dir/download.log" >&2; return 1; }
  fi
}

host_apt_get() { apt-get -q -o APT::Sandbox::User=root "$@"; }

# Backports packages (the lists are refreshed and the download retried
# once if the mirror has moved on).
bpo_download() {
  bpo_init
  _download bpo_apt_get "$DEBS/bpo" "$@" && return 0
  bpo_init force
  _download bpo_apt_get "$DEBS/bpo" "$@"
}

# Packages of the machine's own suite (the machine's apt lists; as root,
# `apt-get update` once if a package has no candidate).
host_download() {
  _download host_apt_get "$DEBS/host" "$@" 2>/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "cannot download $* with the machine's apt lists (run vm-images/install-deps as root, or apt-get update)"
  say "apt-get update (the machine's lists)"
  apt-get -q update >/dev/null || die "apt-get update failed"
  _download host_apt_get "$DEBS/host" "$@"
}

# The lib* entries of a .deb's Depends (first alternative, with versions):
# "name|op|version" lines.
deb_lib_depends() {
  dpkg-deb -f "$1" Depends | tr ',' '\n' | sed 's/|.*//; s/^ *//; s/ *$//' |
    sed -n 's/^\(lib[^ ]*\)\( *(\([<>=]*\) *\([^)]*\))\)\{0,1\}$/\1|\3|\4/p'
}

# qemu's environment: the unpacked tree, and any library of qemu's Depends
# that bookworm cannot satisfy, unpacked from backports by install-deps.
QEMU_BIN=$QEMU_DIR/usr/bin/qemu-system-x86_64
QEMU_LIBS=$B/qemu-libs
qemu_env() {
  export LD_LIBRARY_PATH=$QEMU_LIBS/usr/lib/x86_64-linux-gnu:$QEMU_LIBS/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}
qemu_missing_libs() {
  (qemu_env; ldd "$QEMU_BIN" 2>/dev/null | awk '/not found/ { print $1 }')
}
