#!/usr/bin/env bash
# Install the edgesmith device server on Raspberry Pi OS Bookworm (64-bit) or Debian 12.
#
#   sudo ./install-pi.sh --model out/model.Q4_K_M.gguf [--api-key-file key.txt] [--port 8080]
#
# Idempotent: every step looks at what is there first and prints "unchanged" or "changed";
# a second run with the same options changes nothing. --dry-run only reports what would change;
# --uninstall removes what the script installed. Run with --help for every option.
set -Eeuo pipefail
umask 022
STEP=setup
trap 'echo "${0##*/}: error: step $STEP failed (exit $?); fix the cause and run again (the steps done are kept)" >&2' ERR

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROG=$(basename "$0")
UNIT_TEMPLATE="$SCRIPT_DIR/edgesmith.service"
REQUIREMENTS="$SCRIPT_DIR/requirements-server.txt"
APT_PACKAGES=(python3 python3-venv python3-dev build-essential cmake ca-certificates)
MARKER=".edgesmith-install"

PREFIX=/opt/edgesmith
SOURCE=""
MODEL=""
PORT=""
HOST=""
THREADS=""
CTX=""
API_KEY_FILE=""
NO_API_KEY=0
SERVICE=edgesmith
SERVICE_USER=edgesmith
PYTHON=python3
PIP_ARGS=""
CMAKE_ARGS_OVERRIDE=""
SKIP_APT=0
NO_SYSTEMD=0
DRY_RUN=0
UNINSTALL=0
VERBOSE=0
PRINT_UNIT=0
CHANGED=0
RESTART=0

usage() {
    cat <<EOF
Usage: sudo $PROG --model FILE.gguf [options]

Installs the edgesmith device server: apt packages, a venv under the prefix with llama-cpp-python
built for this CPU, the model (sha256-checked), settings, a launcher, and a hardened systemd
service that runs as a dedicated user and restarts on failure.

Options:
  --model FILE        GGUF model to serve (needed the first time; later runs keep the installed one)
  --prefix DIR        install directory (default: /opt/edgesmith)
  --port N            TCP port (default: 8080)
  --host ADDR         listen address (default: 0.0.0.0 with an API key, else 127.0.0.1)
  --api-key-file F    require 'Authorization: Bearer KEY' with the key in F (copied, mode 0640)
  --no-api-key        remove an installed API key (the server goes back to 127.0.0.1 unless --host)
  --threads N         llama.cpp threads (default: all cores)
  --ctx N             context length in tokens (default: 2048)
  --source PATH       edgesmith wheel, sdist or source directory
                      (default: the repository that holds this script)
  --python EXE        Python for the venv (default: python3)
  --pip-args "ARGS"   extra arguments for every pip install (e.g. "--no-cache-dir")
  --cmake-args "ARGS" CMAKE_ARGS for building llama.cpp (default: picked from /proc/cpuinfo)
  --service NAME      systemd unit and user name (default: edgesmith)
  --skip-apt          do not check or install apt packages
  --no-systemd        no system user, no unit: run PREFIX/bin/edgesmith-server yourself
  --dry-run           print what would change; change nothing
  --uninstall         remove the service, the user and the prefix
  --verbose           show pip's output
  --print-cmake-args  print the CMAKE_ARGS picked for this CPU and exit
  --print-unit        print the systemd unit that would be installed and exit
  -h, --help          this help

Example:
  sudo ./install-pi.sh --model out/model.Q4_K_M.gguf --api-key-file ~/edgesmith.key
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }
note() { echo "$PROG: $*"; }
# step NAME unchanged|changed|"would change" [DETAIL]
report() {
    local name=$1 state=$2 detail=${3:-}
    printf '%-18s %s%s\n' "$name" "$state" "${detail:+: $detail}"
    if [[ $state != unchanged ]]; then CHANGED=$((CHANGED + 1)); fi
}
# act NAME DETAIL COMMAND...: run COMMAND (or only report it under --dry-run)
act() {
    local name=$1 detail=$2
    shift 2
    if ((DRY_RUN)); then
        report "$name" "would change" "$detail"
    else
        STEP=$name
        "$@"
        report "$name" changed "$detail"
    fi
}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

parse_args() {
    while [[ $# -gt 0 ]]; do
        case $1 in
            --model) need_value "$@"; MODEL=$2; shift ;;
            --prefix) need_value "$@"; PREFIX=$2; shift ;;
            --port) need_value "$@"; PORT=$2; shift ;;
            --host) need_value "$@"; HOST=$2; shift ;;
            --api-key-file) need_value "$@"; API_KEY_FILE=$2; shift ;;
            --no-api-key) NO_API_KEY=1 ;;
            --threads) need_value "$@"; THREADS=$2; shift ;;
            --ctx) need_value "$@"; CTX=$2; shift ;;
            --source) need_value "$@"; SOURCE=$2; shift ;;
            --python) need_value "$@"; PYTHON=$2; shift ;;
            --pip-args) need_value "$@"; PIP_ARGS=$2; shift ;;
            --cmake-args) need_value "$@"; CMAKE_ARGS_OVERRIDE=$2; shift ;;
            --service) need_value "$@"; SERVICE=$2; SERVICE_USER=$2; shift ;;
            --skip-apt) SKIP_APT=1 ;;
            --no-systemd) NO_SYSTEMD=1 ;;
            --dry-run) DRY_RUN=1 ;;
            --uninstall) UNINSTALL=1 ;;
            --verbose) VERBOSE=1 ;;
            --print-cmake-args) cmake_args; exit 0 ;;
            --print-unit) PRINT_UNIT=1 ;;
            -h|--help) usage; exit 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
        shift
    done
}

# --- what this machine is ---------------------------------------------------------------

# CMAKE_ARGS for llama.cpp on this CPU. A Pi 5 (Cortex-A76) has the dot-product and fp16
# instructions of Armv8.2-A; a Pi 4 (Cortex-A72) is plain Armv8-A. GGML_NATIVE is off on Arm so
# the flags do not depend on what the compiler guesses; x86 builds for the machine it is on,
# without AMX.
# EDGESMITH_ARCH and EDGESMITH_CPUINFO override uname -m and /proc/cpuinfo (for tests).
cmake_args() {
    if [[ -n $CMAKE_ARGS_OVERRIDE ]]; then echo "$CMAKE_ARGS_OVERRIDE"; return; fi
    local arch features march
    arch=${EDGESMITH_ARCH:-$(uname -m)}
    case $arch in
        aarch64|arm64)
            features=$(grep -m1 -i '^features' "${EDGESMITH_CPUINFO:-/proc/cpuinfo}" || true)
            if [[ $features =~ (^|[[:space:]])(asimddp|asimdhp)($|[[:space:]]) ]]; then
                march=armv8.2-a
                [[ $features =~ (^|[[:space:]])asimddp($|[[:space:]]) ]] && march+=+dotprod
                [[ $features =~ (^|[[:space:]])asimdhp($|[[:space:]]) ]] && march+=+fp16
            else
                march=armv8-a
            fi
            echo "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=$march" ;;
        x86_64|amd64)
            # llama.cpp's AMX matmul crashes on some Sapphire Rapids machines
            # (ggml-org/llama.cpp#20824): compile it out where the compiler knows the flag
            local off="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            # shellcheck disable=SC2086  # a list of flags
            if "${CC:-cc}" $off -x c -E /dev/null >/dev/null 2>&1; then
                echo "-DGGML_NATIVE=ON '-DCMAKE_C_FLAGS=$off' '-DCMAKE_CXX_FLAGS=$off'"
            else
                echo "-DGGML_NATIVE=ON"
            fi ;;
        armv7l|armv6l) die "this is a 32-bit ARM system; install Raspberry Pi OS 64-bit" ;;
        *) die "unsupported CPU architecture $arch" ;;
    esac
}

check_os() {
    local id="" version="" pretty="unknown OS"
    if [[ -r /etc/os-release ]]; then
        # shellcheck source=/dev/null
        id=$(. /etc/os-release && echo "${ID:-}")
        # shellcheck source=/dev/null
        version=$(. /etc/os-release && echo "${VERSION_ID:-}")
        # shellcheck source=/dev/null
        pretty=$(. /etc/os-release && echo "${PRETTY_NAME:-unknown OS}")
    fi
    if [[ ! ($id == debian || $id == raspbian) || $version != 12 ]]; then
        note "warning: made for Raspberry Pi OS Bookworm / Debian 12; this is $pretty"
    fi
}

# --- settings kept between runs -----------------------------------------------------------

ENV_FILE() { echo "$PREFIX/etc/edgesmith.env"; }

# The value of KEY in the installed settings (empty when absent). Read, never sourced.
installed_setting() {
    local key=$1 line
    [[ -r $(ENV_FILE) ]] || return 0
    while IFS= read -r line; do
        if [[ $line == "$key="* ]]; then echo "${line#*=}"; return 0; fi
    done <"$(ENV_FILE)"
}

resolve_settings() {
    [[ $PREFIX == /* ]] || PREFIX="$(pwd)/$PREFIX"
    PREFIX=${PREFIX%/}
    [[ $PREFIX =~ ^/[A-Za-z0-9._/-]+$ ]] || die "--prefix must be an absolute path of letters, digits, '._-/'"
    case $PREFIX in /|/bin|/boot|/dev|/etc|/home|/lib|/opt|/proc|/root|/run|/sbin|/sys|/tmp|/usr|/var)
        die "refusing --prefix $PREFIX: use a directory of its own such as /opt/edgesmith" ;;
    esac
    [[ $SERVICE =~ ^[a-z][a-z0-9-]*$ ]] || die "--service must be lower-case letters, digits, '-'"
    VENV="$PREFIX/venv"
    STAMPS="$VENV/.edgesmith-stamps"
    if ((UNINSTALL)); then return 0; fi

    local old_key
    old_key=$(installed_setting EDGESMITH_API_KEY_FILE)
    if [[ -n $API_KEY_FILE ]]; then
        [[ -r $API_KEY_FILE ]] || die "cannot read the API key file $API_KEY_FILE"
        [[ -n $(tr -d '[:space:]' <"$API_KEY_FILE") ]] || die "the API key file $API_KEY_FILE is empty"
        ((NO_API_KEY == 0)) || die "pass either --api-key-file or --no-api-key"
        KEY_DEST="$PREFIX/etc/api-key"
    elif ((NO_API_KEY)); then
        KEY_DEST=""
    else
        KEY_DEST=$old_key
    fi
    PORT=${PORT:-$(installed_setting EDGESMITH_PORT)}
    PORT=${PORT:-8080}
    if [[ ! $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
        die "--port must be 1-65535"
    fi
    local default_host=127.0.0.1
    [[ -n $KEY_DEST ]] && default_host=0.0.0.0
    # removing the key also takes the server off the network, unless --host says otherwise
    ((NO_API_KEY)) && HOST=${HOST:-$default_host}
    HOST=${HOST:-$(installed_setting EDGESMITH_HOST)}
    HOST=${HOST:-$default_host}
    [[ $HOST =~ ^[A-Za-z0-9.:-]+$ ]] || die "--host must be an address or host name"
    THREADS=${THREADS:-$(installed_setting EDGESMITH_THREADS)}
    THREADS=${THREADS:-$(nproc)}
    [[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive number"
    CTX=${CTX:-$(installed_setting EDGESMITH_CTX)}
    CTX=${CTX:-2048}
    [[ $CTX =~ ^[1-9][0-9]*$ ]] || die "--ctx must be a positive number"

    if [[ -n $MODEL ]]; then
        [[ -f $MODEL && -r $MODEL ]] || die "model $MODEL does not exist or is not readable"
        [[ $(head -c 4 "$MODEL") == GGUF ]] || die "$MODEL is not a GGUF file (bad magic bytes)"
        local name
        name=$(basename "$MODEL")
        [[ $name =~ ^[A-Za-z0-9._+-]+$ ]] || die "rename $MODEL to letters, digits and '._+-' only"
        MODEL_DEST="$PREFIX/models/$name"
    else
        MODEL_DEST=$(installed_setting EDGESMITH_MODEL)
        [[ -n $MODEL_DEST ]] || die "pass --model FILE.gguf (no model is installed yet)"
    fi

    if [[ -z $SOURCE ]]; then
        SOURCE=$(cd "$SCRIPT_DIR/../../.." && pwd)
        [[ -f $SOURCE/pyproject.toml ]] || die "this script is not inside the edgesmith repository; pass --source"
    fi
    [[ -e $SOURCE ]] || die "--source $SOURCE does not exist"
    [[ -r $REQUIREMENTS && -r $UNIT_TEMPLATE ]] || die "$SCRIPT_DIR lacks requirements-server.txt or edgesmith.service"
    if ((NO_SYSTEMD == 0)); then
        [[ $(id -u) == 0 ]] || die "run as root (sudo), or pass --no-systemd to install without a service"
        command -v systemctl >/dev/null || die "systemctl not found; pass --no-systemd"
    fi
}

# --- helpers ------------------------------------------------------------------------------

sha256() { sha256sum "$1" | cut -d' ' -f1; }

# The files of a source tree that make the package: its top-level files and edgesmith/.
source_files() {
    (cd "$SOURCE" && find . -maxdepth 1 -type f -print0 \
        && find edgesmith -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0)
}

# Fingerprint of an edgesmith source: the file's sha256, or the hash of a tree's files.
source_fingerprint() {
    if [[ -f $SOURCE ]]; then sha256 "$SOURCE"; return; fi
    [[ -d $SOURCE/edgesmith ]] || die "--source $SOURCE has no edgesmith/ package directory"
    source_files | LC_ALL=C sort -z | (cd "$SOURCE" && xargs -0 sha256sum) | sha256sum \
        | cut -d' ' -f1
}

stamp_is() { [[ -f $STAMPS/$1 && $(cat "$STAMPS/$1") == "$2" ]]; }
stamp_set() { mkdir -p "$STAMPS" && printf '%s\n' "$2" >"$STAMPS/$1"; }

pip_install() {
    local quiet=(--quiet)
    ((VERBOSE)) && quiet=()
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input "${quiet[@]}" \
        $PIP_ARGS "$@"
}

# Write CONTENT to FILE (mode MODE) atomically, unless it already holds exactly that.
# Returns 0 when the file changed (or would change), 1 when it is already right.
put_file() {
    local name=$1 file=$2 mode=$3 content=$4 owner=${5:-}
    if [[ -f $file && $(cat "$file"; echo x) == "$content"$'\n'x ]] \
        && [[ $(stat -c %a "$file") == "$mode" ]] \
        && [[ -z $owner || $(stat -c %U:%G "$file") == "$owner" ]]; then
        report "$name" unchanged
        return 1
    fi
    if ((DRY_RUN)); then report "$name" "would change" "$file"; return 0; fi
    local tmp
    tmp=$(mktemp "$(dirname "$file")/.$(basename "$file").XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    [[ -z $owner ]] || chown "$owner" "$tmp"
    mv -f "$tmp" "$file"
    report "$name" changed "$file"
    return 0
}

# --- install steps ------------------------------------------------------------------------

step_apt() {
    if ((SKIP_APT)); then report apt unchanged "skipped (--skip-apt)"; return; fi
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then report apt unchanged; return; fi
    ((DRY_RUN)) || [[ $(id -u) == 0 ]] \
        || die "apt packages missing (${missing[*]}): run as root or pass --skip-apt"
    act apt "installed ${missing[*]}" apt_install "${missing[@]}"
}
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

step_user() {
    if ((NO_SYSTEMD)); then return; fi
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then report user unchanged; return; fi
    act user "created system user $SERVICE_USER" \
        useradd --system --user-group --home-dir "/var/cache/$SERVICE" --no-create-home \
        --shell /usr/sbin/nologin --comment "edgesmith device server" "$SERVICE_USER"
}

step_dirs() {
    local d missing=()
    for d in "$PREFIX" "$PREFIX/bin" "$PREFIX/etc" "$PREFIX/models"; do
        [[ -d $d ]] || missing+=("$d")
    done
    [[ -f $PREFIX/$MARKER ]] || missing+=("$PREFIX/$MARKER")
    if ((${#missing[@]} == 0)); then report directories unchanged; return; fi
    act directories "created ${missing[*]}" make_dirs
}
make_dirs() {
    mkdir -p "$PREFIX/bin" "$PREFIX/etc" "$PREFIX/models"
    echo "installed by edgesmith install-pi.sh; --uninstall removes this directory" >"$PREFIX/$MARKER"
}

step_venv() {
    local want have=""
    want=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])') \
        || die "$PYTHON does not run; install python3 or pass --python"
    if [[ -x $VENV/bin/python ]]; then
        have=$("$VENV/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' \
            2>/dev/null || true)
    fi
    if [[ $have == "$want" ]] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        report venv unchanged; return
    fi
    act venv "Python $want in $VENV" make_venv
}
make_venv() {
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
}

step_llama_cpp() {
    local spec args want have=""
    spec=$(grep -m1 '^llama-cpp-python==' "$REQUIREMENTS")
    args=$(cmake_args)
    want="$spec CMAKE_ARGS=$args"
    if [[ -x $VENV/bin/python ]]; then
        have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)
    fi
    if [[ "llama-cpp-python==$have" == "$spec" ]] && stamp_is llama-cpp-python "$want"; then
        report llama-cpp-python unchanged; return
    fi
    local extra=()
    # a different build of the same version: pip's wheel cache would hand back the old one
    [[ -n $have ]] && extra=(--force-reinstall --no-deps --no-cache-dir)
    act llama-cpp-python "$spec built with CMAKE_ARGS=\"$args\" (a Pi takes 10-30 min)" \
        install_llama_cpp "$args" "$want" "$spec" "${extra[@]}"
    RESTART=1
}
install_llama_cpp() {
    local args=$1 want=$2
    shift 2
    CMAKE_ARGS=$args FORCE_CMAKE=1 pip_install "$@"
    stamp_set llama-cpp-python "$want"
}

step_requirements() {
    local want
    want=$(sha256 "$REQUIREMENTS")
    if stamp_is requirements "$want"; then report requirements unchanged; return; fi
    act requirements "pip install -r $(basename "$REQUIREMENTS")" install_requirements "$want"
    RESTART=1
}
install_requirements() {
    pip_install -r "$REQUIREMENTS"
    stamp_set requirements "$1"
}

step_edgesmith() {
    local want
    want=$(source_fingerprint)
    if stamp_is edgesmith "$want" && "$VENV/bin/python" -c 'import edgesmith.device_server.app' 2>/dev/null; then
        report edgesmith unchanged; return
    fi
    act edgesmith "from $SOURCE" install_edgesmith "$want"
    RESTART=1
}
install_edgesmith() {
    local target=$SOURCE tmp=""
    if [[ -d $SOURCE ]]; then
        # build from a copy: a build leaves build/ and *.egg-info behind in the tree it reads
        tmp=$(mktemp -d)
        source_files | tar -C "$SOURCE" --null -T - -cf - | tar -C "$tmp" -xf -
        target=$tmp
    fi
    # --no-deps: the compress side (torch, transformers) is not needed to serve
    pip_install --no-deps --force-reinstall "$target"
    [[ -z $tmp ]] || rm -rf "$tmp"
    stamp_set edgesmith "$1"
}

step_model() {
    if [[ -z $MODEL ]]; then
        [[ -f $MODEL_DEST ]] || die "the installed model $MODEL_DEST is missing; pass --model"
        report model unchanged "$MODEL_DEST"; return
    fi
    local want
    want=$(sha256 "$MODEL")
    # the installed copy is hashed too: a file damaged on the card is copied again
    if [[ -f $MODEL_DEST && $(stat -c %s "$MODEL_DEST") == $(stat -c %s "$MODEL") \
          && $(sha256 "$MODEL_DEST") == "$want" ]]; then
        if [[ ! -f $MODEL_DEST.sha256 || $(cut -d' ' -f1 "$MODEL_DEST.sha256") != "$want" ]]; then
            act model "recorded $MODEL_DEST.sha256" write_model_sha "$want"
            return
        fi
        report model unchanged "$MODEL_DEST"; return
    fi
    act model "$MODEL -> $MODEL_DEST (sha256 ${want:0:12})" copy_model "$want"
    RESTART=1
}
copy_model() {
    local want=$1 tmp got
    tmp=$(mktemp "$PREFIX/models/.incoming.XXXXXX")
    cp "$MODEL" "$tmp"
    got=$(sha256 "$tmp")
    if [[ $got != "$want" ]]; then
        rm -f "$tmp"
        die "the copy of $MODEL has sha256 $got, expected $want (disk or card failing?)"
    fi
    chmod 0644 "$tmp"
    mv -f "$tmp" "$MODEL_DEST"
    write_model_sha "$want"
}
write_model_sha() { printf '%s  %s\n' "$1" "$(basename "$MODEL_DEST")" >"$MODEL_DEST.sha256"; }

step_api_key() {
    local dest="$PREFIX/etc/api-key" owner="" mode=600
    if ((NO_SYSTEMD == 0)); then owner="root:$SERVICE_USER"; mode=640; fi
    if [[ -n $API_KEY_FILE ]]; then
        local key
        key=$(tr -d '[:space:]' <"$API_KEY_FILE")
        if put_file api-key "$dest" "$mode" "$key" "$owner"; then RESTART=1; fi
    elif [[ -z $KEY_DEST && -e $dest ]]; then
        act api-key "removed $dest" rm -f "$dest"
        RESTART=1
    else
        report api-key unchanged "${KEY_DEST:-none (the server only listens on $HOST)}"
    fi
}

step_settings() {
    local content
    content="# edgesmith device server settings, written by install-pi.sh (re-run it to change
# them, or edit and restart the service). Plain KEY=VALUE lines: no quotes, no spaces.
EDGESMITH_MODEL=$MODEL_DEST
EDGESMITH_HOST=$HOST
EDGESMITH_PORT=$PORT
EDGESMITH_THREADS=$THREADS
EDGESMITH_CTX=$CTX
EDGESMITH_API_KEY_FILE=$KEY_DEST"
    if ((DRY_RUN)) && [[ ! -d $PREFIX/etc ]]; then
        report settings "would change" "$(ENV_FILE)"; return
    fi
    if put_file settings "$(ENV_FILE)" 644 "$content"; then RESTART=1; fi

    local launcher
    launcher="#!/bin/sh
# Start the edgesmith device server with the settings in $PREFIX/etc/edgesmith.env
# (written by install-pi.sh; systemd runs this as $SERVICE.service).
set -eu
env_file=$PREFIX/etc/edgesmith.env
setting() { sed -n \"s/^\$1=//p\" \"\$env_file\" | tail -n 1; }
key=\$(setting EDGESMITH_API_KEY_FILE)
set -- serve \"\$(setting EDGESMITH_MODEL)\" --host \"\$(setting EDGESMITH_HOST)\" \\
    --port \"\$(setting EDGESMITH_PORT)\" --threads \"\$(setting EDGESMITH_THREADS)\" \\
    --ctx \"\$(setting EDGESMITH_CTX)\" \"\$@\"
if [ -n \"\$key\" ]; then set -- \"\$@\" --api-key-file \"\$key\"; fi
exec $VENV/bin/edgesmith \"\$@\""
    if ((DRY_RUN)) && [[ ! -d $PREFIX/bin ]]; then
        report launcher "would change" "$PREFIX/bin/edgesmith-server"; return
    fi
    if put_file launcher "$PREFIX/bin/edgesmith-server" 755 "$launcher"; then RESTART=1; fi
}

UNIT_FILE() { echo "/etc/systemd/system/$SERVICE.service"; }

render_unit() {
    sed -e '/^#@/d' -e "s|@PREFIX@|$PREFIX|g" -e "s|@USER@|$SERVICE_USER|g" -e "s|@SERVICE@|$SERVICE|g" \
        "$UNIT_TEMPLATE"
}

step_unit() {
    if ((NO_SYSTEMD)); then return; fi
    local content
    content=$(render_unit)
    if put_file systemd-unit "$(UNIT_FILE)" 644 "$content"; then
        RESTART=1
        ((DRY_RUN)) || systemctl daemon-reload
    fi
}

step_service() {
    if ((NO_SYSTEMD)); then
        report service unchanged "none (--no-systemd); start it with $PREFIX/bin/edgesmith-server"
        return
    fi
    local enabled active
    enabled=$(systemctl is-enabled "$SERVICE" 2>/dev/null || true)
    active=$(systemctl is-active "$SERVICE" 2>/dev/null || true)
    if [[ $enabled == enabled && $active == active ]] && ((RESTART == 0)); then
        report service unchanged "$SERVICE is enabled and running"; return
    fi
    act service "enabled and (re)started $SERVICE" start_service
    ((DRY_RUN)) || wait_healthy
}
start_service() {
    systemctl enable --quiet "$SERVICE"
    systemctl restart "$SERVICE"
}

wait_healthy() {
    local url="http://127.0.0.1:$PORT/health" i
    [[ $HOST == 127.0.0.1 || $HOST == 0.0.0.0 || $HOST == localhost ]] || url="http://$HOST:$PORT/health"
    for ((i = 0; i < 120; i++)); do
        if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; then
            note "the server answers $url"
            return 0
        fi
        sleep 1
    done
    die "$SERVICE did not answer $url within 120 s; see: journalctl -u $SERVICE"
}

# --- uninstall ----------------------------------------------------------------------------

uninstall() {
    if command -v systemctl >/dev/null && [[ -f $(UNIT_FILE) ]]; then
        act service "stopped and disabled $SERVICE" systemctl disable --now --quiet "$SERVICE"
        act systemd-unit "removed $(UNIT_FILE)" remove_unit
    else
        report systemd-unit unchanged "not installed"
    fi
    if ((NO_SYSTEMD == 0)) && id -u "$SERVICE_USER" >/dev/null 2>&1; then
        act user "removed system user $SERVICE_USER" userdel "$SERVICE_USER"
    fi
    if [[ -d $PREFIX ]]; then
        [[ -f $PREFIX/$MARKER ]] || die "$PREFIX was not made by this script (no $MARKER); not removing it"
        act prefix "removed $PREFIX" rm -rf "$PREFIX"
    else
        report prefix unchanged "$PREFIX does not exist"
    fi
}
remove_unit() {
    rm -f "$(UNIT_FILE)"
    systemctl daemon-reload
}

main() {
    parse_args "$@"
    if ((PRINT_UNIT)); then
        UNINSTALL=1 resolve_settings  # the prefix and names only
        render_unit
        return 0
    fi
    resolve_settings
    if ((UNINSTALL)); then
        uninstall
    else
        check_os
        step_apt
        step_user
        step_dirs
        if ((DRY_RUN)) && [[ ! -d $PREFIX ]]; then
            # nothing below exists yet: every step would change
            local s
            for s in venv llama-cpp-python requirements edgesmith model api-key settings launcher; do
                report "$s" "would change"
            done
            ((NO_SYSTEMD)) || { report systemd-unit "would change"; report service "would change"; }
        else
            step_venv
            step_llama_cpp
            step_requirements
            step_edgesmith
            step_model
            step_api_key
            step_settings
            step_unit
            step_service
        fi
    fi
    if ((CHANGED == 0)); then
        note "nothing changed"
    elif ((DRY_RUN)); then
        note "dry run: $CHANGED step(s) would change; nothing was changed"
    else
        note "done: $CHANGED step(s) changed"
    fi
}

main "$@"
