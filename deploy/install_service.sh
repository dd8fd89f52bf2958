#!/usr/bin/env bash
# Install a Lineguard service under systemd on a line machine: the agent (default), the reject actuator or the
# line dashboard. Safe to run again (after an upgrade, say): every step is skipped when already done, and an
# existing configuration is never overwritten.
#
#   sudo deploy/install_service.sh [--service agent|actuator|ui] [--prefix DIR] [--dry-run]
#
#   --service S   which service: agent (lineguard-agent, the default), actuator (lineguard-actuator) or
#                 ui (lineguard-ui); run the script once per service the machine runs
#   --prefix DIR  where Lineguard is installed: the service runs DIR/.venv/bin/lineguard-S
#                 (default /opt/lineguard; the unit's ExecStart= is rewritten to match)
#   --dry-run     print what would be done and change nothing (needs no root)
#
# Steps:
#   1. agent and actuator: system user and group `lineguard` (home /var/lib/lineguard, no login shell), member
#      of group video (USB cameras; the unit also grants video itself, this is for running check-config as the
#      user). The dashboard runs as a dynamic user and needs none.
#   2. /etc/lineguard (root:lineguard 0750) with S.toml and S.env (root only, 0600) copied from
#      systemd/S.toml.example and systemd/S.env.example where those exist and the files are missing; S.toml is
#      root:lineguard 0640, except the dashboard's (root 0600: systemd hands it over as a credential)
#   3. agent: /var/lib/lineguard (lineguard, 0750): the model store, so a bundle can be put there before the
#      first start
#   4. /etc/systemd/system/lineguard-S.service, then `systemctl daemon-reload` and `systemctl enable`;
#      the two systemctl calls are skipped, with a message, where systemd is not PID 1 (a container)
# It does not start the service: the agent needs a bundle and the trainer's public key first, the others their
# broker settings (systemd/README.md).
# Exit codes: 0 done, 2 bad arguments or not root, 1 a step failed (the message above it says which).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UNIT_DIR=/etc/systemd/system
CONFIG_DIR=/etc/lineguard
STATE_DIR=/var/lib/lineguard
SERVICE_USER=lineguard
CAMERA_GROUP=video

SERVICE=agent
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
            --service)
                [ $# -ge 2 ] || fail "--service needs a name: agent, actuator or ui" 2
                SERVICE=$2
                shift 2
                ;;
            --service=*) SERVICE=${1#--service=}; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) fail "unknown argument '$1'; see --help" 2 ;;
        esac
    done
    PREFIX=${PREFIX%/}
    # The prefix lands in ExecStart= unquoted and in a sed expression: keep it to plain path characters.
    [[ $PREFIX =~ ^/[A-Za-z0-9._/-]*$ ]] ||
        fail "--prefix must be an absolute path of letters, digits and ._-/ (got '$PREFIX')" 2
    case "$SERVICE" in
        # SERVICE_ACCOUNT: runs as user lineguard (else a dynamic user); CONFIG_MODE/GROUP: its S.toml.
        agent | actuator) SERVICE_ACCOUNT=1; CONFIG_MODE=0640; CONFIG_GROUP=$SERVICE_USER ;;
        ui) SERVICE_ACCOUNT=0; CONFIG_MODE=0600; CONFIG_GROUP=root ;;
        *) fail "--service must be agent, actuator or ui (got '$SERVICE')" 2 ;;
    esac
    UNIT_NAME=lineguard-$SERVICE.service
    UNIT_TEMPLATE=$REPO/systemd/$UNIT_NAME
    # The command as the unit in the repository names it; --prefix replaces its directory.
    TEMPLATE_EXEC=/opt/lineguard/.venv/bin/lineguard-$SERVICE
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
    if [ "$SERVICE_ACCOUNT" -eq 1 ]; then
        say "directory $CONFIG_DIR (root:$SERVICE_USER 0750)"
        run install -d -m 0750 -o root -g "$SERVICE_USER" "$CONFIG_DIR"
    elif [ -d "$CONFIG_DIR" ]; then
        say "directory $CONFIG_DIR exists: kept as it is (the dashboard's files reach it as credentials)"
    else
        say "directory $CONFIG_DIR (root 0750)"
        run install -d -m 0750 -o root -g root "$CONFIG_DIR"
    fi
    install_if_missing "$REPO/systemd/$SERVICE.toml.example" "$CONFIG_DIR/$SERVICE.toml" "$CONFIG_MODE" root "$CONFIG_GROUP"
    if [ -f "$REPO/systemd/$SERVICE.env.example" ]; then
        install_if_missing "$REPO/systemd/$SERVICE.env.example" "$CONFIG_DIR/$SERVICE.env" 0600 root root
    fi
    if [ "$SERVICE" = agent ]; then
        say "directory $STATE_DIR ($SERVICE_USER:$SERVICE_USER 0750, the model store)"
        run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
    fi
}

install_unit() {
    local exec_path=$PREFIX/.venv/bin/lineguard-$SERVICE
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
    [ "$SERVICE_ACCOUNT" -eq 0 ] || ensure_user
    ensure_directories
    install_unit
    enable_unit
    local check_as="sudo -u $SERVICE_USER"
    if [ "$SERVICE" = agent ]; then
        [ -f "$CONFIG_DIR/trainer.pub" ] ||
            say "next: copy the trainer's public key to $CONFIG_DIR/trainer.pub (lineguard-train keygen wrote it)"
        say "next: put a bundle at $STATE_DIR/models/active"
    fi
    [ "$SERVICE_ACCOUNT" -eq 1 ] || check_as=sudo
    say "next: edit $CONFIG_DIR/$SERVICE.toml (and $SERVICE.env if it has secrets), check it with"
    say "  $check_as $PREFIX/.venv/bin/lineguard-$SERVICE check-config --config $CONFIG_DIR/$SERVICE.toml"
    say "then: sudo systemctl start $UNIT_NAME && journalctl -fu $UNIT_NAME"
}

main "$@"
