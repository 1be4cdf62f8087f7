#!/usr/bin/env bash
# Run essd.service as shipped under the real systemd, on a machine where systemd is not PID 1
# (a CI container, a build VM): systemd boots as PID 1 of throwaway namespaces (pid, mount,
# network, uts, ipc, cgroup) that hold only the essd units. The host is left alone: inside,
# /etc is a copy, /run, /tmp and /var/lib are empty tmpfs, the network is loopback only, and
# everything ends with the namespace. Reports what systemd reports: start, status line,
# watchdog pings, restarts, and the result of a SIGTERM stop.
#
# Usage (as root):
#   systemd/trial.sh --config FILE [--with-sim] [--drop-in FILE]... [--exec CMD]
#                    [--watchdog SPAN] [--seconds N]
#   --config FILE   the site configuration, seen as /etc/essd/essd.toml
#   --with-sim      also start essd-sim.service first (devices simulated on loopback, e.g.
#                   with profiles/sites/example.toml)
#   --drop-in FILE  an extra drop-in for essd.service (e.g. systemd/serial-port.conf)
#   --exec CMD      replace ExecStart= (a stand-in program, for instance)
#   --watchdog SPAN override WatchdogSec= (e.g. 4s, to see a watchdog kill quickly)
#   --seconds N     how long essd runs before `systemctl stop` (default 30)
#
# essd must be installed as docs/deployment.md says, in /opt/essd/venv, with a Python outside
# /root, /home and /tmp (the unit hides those): `/usr/bin/python3 -m venv /opt/essd/venv`.
# Exit status 0 when essd became active and stopped cleanly (Result=success), 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
config="" with_sim=0 exec_cmd="" watchdog="" seconds=30
drop_ins=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$(realpath "$2"); shift 2 ;;
    --with-sim) with_sim=1; shift ;;
    --drop-in) drop_ins+=("$(realpath "$2")"); shift 2 ;;
    --exec) exec_cmd=$2; shift 2 ;;
    --watchdog) watchdog=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "trial.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
die() { echo "trial.sh: $*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "run as root (it creates namespaces and mounts)"
[ -n "$config" ] && [ -f "$config" ] || die "--config FILE: a site configuration is required"
[ -d /run/systemd/system ] && die "systemd already runs this machine: install the unit instead"
[ -n "$exec_cmd" ] || [ -x /opt/essd/venv/bin/essd ] || die "/opt/essd/venv/bin/essd: install essd first"
systemd_bin=/lib/systemd/systemd
[ -x "$systemd_bin" ] || die "$systemd_bin not found (Debian package: systemd)"

work=$(mktemp -d /tmp/essd-trial.XXXXXX)
units=$work/units
mkdir -p "$units/essd.service.d"
cp "$here/essd.service" "$units/"
# Only the units below exist inside: no sysinit.target, no network-online.target.
cat >"$units/trial.target" <<EOF
[Unit]
Description=essd trial
DefaultDependencies=no
EOF
{
  echo "[Unit]"
  echo "DefaultDependencies=no"
  echo "[Service]"
  echo "StandardOutput=append:/run/trial/essd.log"
  echo "StandardError=append:/run/trial/essd.log"
  [ -n "$exec_cmd" ] && printf 'ExecStart=\nExecStart=%s\n' "$exec_cmd"
  [ -n "$watchdog" ] && echo "WatchdogSec=$watchdog"
} >"$units/essd.service.d/zz-trial.conf"
for d in "${drop_ins[@]}"; do cp "$d" "$units/essd.service.d/"; done
if [ "$with_sim" -eq 1 ]; then
  mkdir -p "$units/essd-sim.service.d"
  cp "$here/essd-sim.service" "$units/"
  printf '[Unit]\nDefaultDependencies=no\n[Service]\nStandardOutput=append:/run/trial/essd-sim.log\nStandardError=append:/run/trial/essd-sim.log\n' \
    >"$units/essd-sim.service.d/zz-trial.conf"
fi
cp -a /etc "$work/etc"
mkdir -p "$work/etc/essd"
cp "$config" "$work/etc/essd/essd.toml"

cat >"$work/boot.sh" <<EOF
#!/bin/sh
set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/trial && mount --bind "$work" /run/trial
mount --bind "$work/etc" /etc
mount -t tmpfs tmpfs /var/lib
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
exec env -i container=essd-trial SYSTEMD_UNIT_PATH=/run/trial/units \
  PATH=/usr/sbin:/usr/bin:/sbin:/bin $systemd_bin --system --unit=trial.target
EOF
chmod +x "$work/boot.sh"

# systemd creates its cgroups below ours in the host's cgroup2 hierarchy: note what exists.
cg2=$(findmnt -n -t cgroup2 -o TARGET | head -n1 || true)
cg_self=$(sed -n 's/^0:://p' /proc/self/cgroup)
cg_dir=${cg2:+$cg2$cg_self}
before=$(mktemp)
[ -n "$cg_dir" ] && find "$cg_dir" -mindepth 1 -type d | sort >"$before"

unshare --pid --fork --mount --uts --ipc --net --cgroup --propagation private --mount-proc \
  "$work/boot.sh" >"$work/pid1.log" 2>&1 &
unshare_pid=$!
pid1=""
teardown() {
  [ -n "$pid1" ] && kill -KILL "$pid1" 2>/dev/null || true
  wait "$unshare_pid" 2>/dev/null || true
  if [ -n "$cg_dir" ]; then  # the cgroups systemd left, deepest first
    find "$cg_dir" -mindepth 1 -type d | sort | comm -13 "$before" - | sort -r |
      while read -r d; do rmdir "$d" 2>/dev/null || true; done
  fi
  rm -rf "$work" "$before"
}
trap teardown EXIT

for _ in $(seq 50); do
  pid1=$(ps -o pid= --ppid "$unshare_pid" | tr -d ' ' || true)
  [ -n "$pid1" ] && nsenter -t "$pid1" -a systemctl is-system-running >/dev/null 2>&1 && break
  sleep 0.2
done
[ -n "$pid1" ] || { cat "$work/pid1.log"; die "systemd did not start"; }
inside() { nsenter -t "$pid1" -a "$@"; }
props=(-p ActiveState -p SubState -p Result -p NRestarts -p StatusText -p WatchdogUSec
  -p WatchdogTimestamp -p ExecMainStatus)

if [ "$with_sim" -eq 1 ]; then
  echo "== systemctl start essd-sim"
  inside systemctl start essd-sim.service || true
fi
echo "== systemctl start essd (returns once essd sends READY=1)"
started=$(date +%s.%N)
if inside systemctl start essd.service; then
  echo "active after $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $started }") s"
else
  echo "start failed"
fi
inside systemctl status --no-pager essd.service || true
for ((t = 0; t < seconds; t += 5)); do
  sleep 5
  echo "== after $((t + 5)) s"
  inside systemctl show "${props[@]}" essd.service
done
echo "== systemctl stop essd (SIGTERM: safe stop)"
stop_started=$(date +%s.%N)
inside systemctl stop essd.service || true
echo "stopped after $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $stop_started }") s"
result=$(inside systemctl show -p Result --value essd.service)
inside systemctl show "${props[@]}" essd.service
echo "== essd output"
cat "$work/essd.log" 2>/dev/null || true
if [ "$with_sim" -eq 1 ]; then
  echo "== essd-sim output"
  tail -n 50 "$work/essd-sim.log" 2>/dev/null || true
fi
[ "$result" = success ]
