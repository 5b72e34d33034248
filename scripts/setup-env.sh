# Sourced by scripts/test, scripts/demo and scripts/bench: installs the Debian
# packages and the Python virtualenv (.venv) p2pfs needs.  Idempotent and quiet
# when everything is already there.
p2pfs_setup() {
    local extras="${1:-}"
    # fuse3 ... python3-dev: the mount and pyfuse3; git tar rsync stress-ng fio: the
    # writable mount's acceptance tests and benchmark (tests/test_rwmount.py, bench_rw.py);
    # systemd: systemd-analyze, which checks the shipped user units (tests/test_mount_options.py)
    local pkgs=(fuse3 libfuse3-dev pkg-config iproute2 util-linux gcc python3-dev
                git tar rsync stress-ng fio systemd)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    # python3-dev is only needed when the interpreter has no headers of its own.
    if [ ${#missing[@]} -gt 0 ] && [ "${missing[*]}" != "python3-dev" ]; then
        echo "p2pfs: installing Debian packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    local py="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo "p2pfs: creating .venv" >&2
        "$py" -m venv .venv
    fi
    local spec="."
    [ -n "$extras" ] && spec=".[${extras}]"
    local stamp=".venv/.p2pfs-installed-${extras:-base}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "p2pfs: installing Python packages into .venv (pyfuse3 builds from source, ~30 s)" >&2
        if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" \
                > .venv/pip-install.log 2>&1; then
            cat .venv/pip-install.log >&2
            echo "p2pfs: pip install failed (log above, also in .venv/pip-install.log)" >&2
            return 1
        fi
        touch "$stamp"
    fi
    export P2PFS_PYTHON="$PWD/.venv/bin/python"
    export PATH="$PWD/.venv/bin:$PATH"
}
