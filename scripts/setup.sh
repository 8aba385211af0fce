# Installs what building and testing Hearth needs on Debian/Ubuntu, and nothing that is already
# there. Sourced by scripts/agent and scripts/test, so PATH changes (a fresh rustup) carry over.
# Safe to run again.

set -euo pipefail

# The oldest Rust that builds the workspace (rust-version in Cargo.toml).
HEARTH_MIN_RUST=1.95

hearth_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

hearth_apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "setup: installing ${missing[*]}" >&2
        hearth_as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive hearth_as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

hearth_rust_is_recent() {
    command -v cargo >/dev/null 2>&1 || return 1
    local have
    have=$(rustc --version | awk '{print $2}')
    [ "$(printf '%s\n%s\n' "$HEARTH_MIN_RUST" "$have" | sort -V | head -n1)" = "$HEARTH_MIN_RUST" ]
}

if command -v apt-get >/dev/null 2>&1; then
    # A C compiler for the bundled SQLite and ring; libseccomp for the job sandbox's filter; curl
    # and certificates only to fetch rustup.
    hearth_apt_install gcc libc6-dev pkg-config libseccomp-dev ca-certificates curl
    # slirp4netns gives jobs granted network their outbound-only link; iproute2 and util-linux
    # (nsenter) build the test networks in namespaces, and nftables their home routers' NAT.
    hearth_apt_install slirp4netns iproute2 util-linux nftables
    # An agent running as root gives each job's disk a kernel limit: an ext4 image (e2fsprogs)
    # loop-mounted by `mount`.
    hearth_apt_install e2fsprogs mount
    # The tests check docs/protocol.md with a verifier written in Python from it alone.
    if [ "${HEARTH_SETUP_WASM:-0}" = 1 ] && ! command -v python3 >/dev/null 2>&1; then
        hearth_apt_install python3
    fi
fi

if [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
if ! hearth_rust_is_recent; then
    if command -v rustup >/dev/null 2>&1; then
        echo "setup: updating the Rust toolchain to stable" >&2
        rustup toolchain install stable --profile minimal --component clippy,rustfmt
        rustup default stable
    else
        echo "setup: installing Rust with rustup" >&2
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
            | sh -s -- -y --profile minimal --component clippy,rustfmt
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
fi
hearth_rust_is_recent || { echo "setup: Rust $HEARTH_MIN_RUST or newer is needed" >&2; exit 1; }
if command -v rustup >/dev/null 2>&1; then
    for component in clippy rustfmt; do
        rustup component list --installed 2>/dev/null | grep -q "^$component" \
            || rustup component add "$component"
    done
    # The tests build WASI job modules; the agent itself does not need this target.
    if [ "${HEARTH_SETUP_WASM:-0}" = 1 ]; then
        rustup target list --installed | grep -q '^wasm32-wasip1$' || rustup target add wasm32-wasip1
    fi
fi
