#!/usr/bin/env bash
# System packages the services and their tests need (Debian 12 or 13): redis-server for the
# trajectory buffer, prometheus (+ promtool) for the metrics tests, and a Vulkan driver new enough
# for SAPIEN's renderer (Mesa >= 24.3: lavapipe gained VK_KHR_external_semaphore_fd). Debian 12's
# own Mesa is 22.3, so there it comes from bookworm-backports. Idempotent; skipped when all present.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v promtool >/dev/null || need+=(prometheus)
mesa=$(dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null || echo 0)
dpkg --compare-versions "$mesa" ge 24.3 || need+=(vulkan)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
mesa_target=()
if [ "$codename" = "bookworm" ]; then
  # Add bookworm-backports with the same mirror as the existing bookworm entry.
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # The URI of the deb822 stanza or one-line entry that carries the plain "bookworm" suite.
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
      /etc/apt/sources.list.d/*.list 2>/dev/null | awk '
        /^URIs:/ { u = $2 }
        /^Suites:/ && / bookworm( |$)/ && u != "" { print u; exit }
        /^deb / && / bookworm / { for (i = 2; i <= NF; i++) if ($i ~ /^http/) { print $i; exit } }
      ' || true)
    uri=${uri:-http://deb.debian.org/debian}
    echo "deb $uri bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
  fi
  mesa_target=(-t bookworm-backports)
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server prometheus >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${mesa_target[@]}" \
  mesa-vulkan-drivers libvulkan1 >/dev/null
# The distro units are not used: tests start their own servers on free loopback ports.
echo "system packages ok: $(redis-server --version | cut -d' ' -f3) $(promtool --version 2>&1 | head -n1)"
