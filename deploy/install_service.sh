#!/usr/bin/env bash
# Install lineguard-agent as a systemd service on a line machine. Safe to run again (after an upgrade, say):
# every step is skipped when already done, and an existing configuration is never overwritten.
#
#   sudo deploy/install_service.sh [--prefix DIR] [--dry-run]
#
#   --prefix DIR  where Lineguard is installed: the service runs DIR/.venv/bin/lineguard-agent
#                 (default /opt/lineguard; the unit's ExecStart= is rewritten to match)
#   --dry-run     print what would be done and change nothing (needs no root)
#
# Steps:
#   1. system user and group `lineguard` (home /var/lib/lineguard, no login shell), member of group video
#      (USB cameras; the unit also grants video itself, this is for running check-config as the user)
#   2. /etc/lineguard (root:lineguard 0750) with agent.toml (0640) and agent.env (root only, 0600) copied
#      from systemd/agent.toml.example and systemd/agent.env.example if they are missing
#   3. /var/lib/lineguard (lineguard, 0750): the model store, so a bundle can be put there before the first start
#   4. /etc/systemd/system/lineguard-agent.service, then `systemctl daemon-reload` and `systemctl enable`;
#      the two systemctl calls are skipped, with a message, where systemd is not PID 1 (a container)
# It does not start the agent: that needs a bundle and the trainer's public key first (systemd/README.md).
# Exit codes: 0 done, 2 bad arguments or not root, 1 a step failed (the message above it says which).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNIT_NAME=lineguard-agent.service
UNIT_TEMPLATE=$REPO/systemd/$UNIT_NAME
# The command as the unit in the repository names it; --prefix replaces its directory.
TEMPLATE_EXEC=/opt/lineguard/.venv/bin/lineguard-agent
UNIT_DIR=/etc/systemd/system
CONFIG_DIR=/etc/lineguard
STATE_DIR=/var/lib/lineguard
SERVICE_USER=lineguard
CAMERA_GROUP=video

PREFIX=/opt/lineguard
DRY_RUN=0

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
fail() {
    printf 'install_service.sh: error: %s\n' "$1" >&2
    exit "${2:-1}"
}
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# Run a command, or only show it under --dry-run.
run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        local quoted
        quoted=$(printf '%q ' "$@")
        printf 'would run: %s\n' "${quoted% }"
    else
        "$@"
    fi
}

parse_arguments() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --prefix)
                [ $# -ge 2 ] || fail "--prefix needs a directory, e.g. --prefix /opt/lineguard" 2
                PREFIX=$2
                shift 2
                ;;
            --prefix=*) PREFIX=${1#--prefix=}; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) fail "unknown argument '$1'; see --help" 2 ;;
        esac
    done
    PREFIX=${PREFIX%/}
    # The prefix lands in ExecStart= unquoted and in a sed expression: keep it to plain path characters.
    [[ $PREFIX =~ ^/[A-Za-z0-9._/-]*$ ]] ||
        fail "--prefix must be an absolute path of letters, digits and ._-/ (got '$PREFIX')" 2
    if [ "$DRY_RUN" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
        fail "run it as root (sudo $0 ...), or add --dry-run to see what it would do" 2
    fi
    [ -f "$UNIT_TEMPLATE" ] || fail "$UNIT_TEMPLATE is missing: run the script from a Lineguard checkout"
}

ensure_user() {
    if ! getent group "$CAMERA_GROUP" >/dev/null; then
        say "creating system group $CAMERA_GROUP (owner of /dev/video* on Debian and Ubuntu)"
        run groupadd --system "$CAMERA_GROUP"
    fi
    if getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER exists"
        if ! id -nG "$SERVICE_USER" | tr ' ' '\n' | grep -qx "$CAMERA_GROUP"; then
            say "adding user $SERVICE_USER to group $CAMERA_GROUP"
            run usermod --append --groups "$CAMERA_GROUP" "$SERVICE_USER"
        fi
        return
    fi
    local group_option=--user-group
    # useradd --user-group refuses to reuse a group of the same name left behind by an earlier install.
    getent group "$SERVICE_USER" >/dev/null && group_option="--gid=$SERVICE_USER"
    say "creating system user $SERVICE_USER (home $STATE_DIR, no login shell, groups $CAMERA_GROUP)"
    run useradd --system "$group_option" --groups "$CAMERA_GROUP" --home-dir "$STATE_DIR" --no-create-home \
        --shell "$(command -v nologin || echo /usr/sbin/nologin)" --comment "Lineguard inspection agent" \
        "$SERVICE_USER"
}

# Copy an example to its place unless something is already there: a site's configuration is never overwritten.
install_if_missing() {
    local source=$1 target=$2 mode=$3 owner=$4 group=$5
    if [ -e "$target" ]; then
        say "$target exists: kept as it is"
        return
    fi
    say "installing $target from ${source#"$REPO"/} (mode $mode, $owner:$group)"
    run install -m "$mode" -o "$owner" -g "$group" "$source" "$target"
}

ensure_directories() {
    say "directory $CONFIG_DIR (root:$SERVICE_USER 0750)"
    run install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
    install_if_missing "$REPO/systemd/agent.toml.example" "$CONFIG_DIR/agent.toml" 0640 root "$SERVICE_USER"
    install_if_missing "$REPO/systemd/agent.env.example" "$CONFIG_DIR/agent.env" 0600 root root
    say "directory $STATE_DIR ($SERVICE_USER:$SERVICE_USER 0750, the model store)"
    run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
}

install_unit() {
    local exec_path=$PREFIX/.venv/bin/lineguard-agent
    local target=$UNIT_DIR/$UNIT_NAME
    local rendered
    rendered=$(sed "s#^ExecStart=$TEMPLATE_EXEC #ExecStart=$exec_path #" "$UNIT_TEMPLATE")
    grep -q "^ExecStart=$exec_path " <<<"$rendered" ||
        fail "$UNIT_TEMPLATE no longer starts with ExecStart=$TEMPLATE_EXEC; update TEMPLATE_EXEC in $0"
    [ -x "$exec_path" ] ||
        warn "$exec_path does not exist yet: install Lineguard into $PREFIX/.venv before starting the service"
    if [ -f "$target" ] && [ "$(cat "$target")" = "$rendered" ]; then
        say "unit $target is up to date"
    elif [ "$DRY_RUN" -eq 1 ]; then
        say "unit $UNIT_NAME would be written to $target with ExecStart=$exec_path ..."
    else
        say "installing unit $target (ExecStart=$exec_path ...)"
        printf '%s\n' "$rendered" >"$target.tmp"
        chmod 0644 "$target.tmp"
        mv "$target.tmp" "$target"
    fi
}

enable_unit() {
    # sd_booted(): systemd creates /run/systemd/system only when it runs as PID 1.
    if [ ! -d /run/systemd/system ]; then
        say "systemd is not running as PID 1 here (no /run/systemd/system; a container?): skipped" \
            "'systemctl daemon-reload' and 'systemctl enable $UNIT_NAME'; run them on the line machine"
        return
    fi
    run systemctl daemon-reload
    run systemctl enable "$UNIT_NAME"
}

main() {
    parse_arguments "$@"
    [ "$DRY_RUN" -eq 0 ] || say "dry run: nothing is changed"
    ensure_user
    ensure_directories
    install_unit
    enable_unit
    [ -f "$CONFIG_DIR/trainer.pub" ] ||
        say "next: copy the trainer's public key to $CONFIG_DIR/trainer.pub (lineguard-train keygen wrote it)"
    say "next: put a bundle at $STATE_DIR/models/active, edit $CONFIG_DIR/agent.toml (and agent.env), check it with"
    say "  sudo -u $SERVICE_USER $PREFIX/.venv/bin/lineguard-agent check-config --config $CONFIG_DIR/agent.toml"
    say "then: sudo systemctl start $UNIT_NAME && journalctl -fu $UNIT_NAME"
}

main "$@"
