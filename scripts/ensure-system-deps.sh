#!/usr/bin/env bash
# Make sure the system programs that the test suite runs for real are installed.
# As root: apt-get install whatever is missing. Otherwise: fail at once, naming the packages
# and the exact command to run. Tests never skip for a missing program.
set -euo pipefail

declare -A need=(
  [mosquitto]=mosquitto            # real MQTT broker for the MQTT tests
  [mosquitto_sub]=mosquitto-clients
  [promtool]=prometheus            # promtool check/test rules, check metrics
  [prometheus]=prometheus          # real Prometheus scraping essd
  [systemd-analyze]=systemd        # unit verification and security score
  [socat]=socat                    # pty pairs: a real serial line for Modbus RTU
  [tmux]=tmux                      # a real terminal for the screen of `make demo`
)

found() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]
}

missing=()
for cmd in "${!need[@]}"; do
  found "$cmd" || missing+=("${need[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "essd: installing system packages for the tests: ${pkgs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  # The Debian packages start their own daemons where an init system runs; the tests start
  # private instances on free loopback ports and need none of those.
  exit 0
fi

cat >&2 <<MSG
essd: the test suite needs these Debian packages, which are not installed: ${pkgs[*]}
Install them with:
    sudo apt-get install -y ${pkgs[*]}
then run 'make test' again.
MSG
exit 1
