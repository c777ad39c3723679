#!/bin/sh
# Installs the Debian packages behind the named commands when they are missing.
# Usage: ensure-tools.sh curl wrk nginx h2load
set -e
missing=""
for tool in "$@"; do
  command -v "$tool" >/dev/null 2>&1 && continue
  case "$tool" in
    nginx) [ -x /usr/sbin/nginx ] && continue; pkg=nginx-light ;;
    nginx-stream) [ -f /usr/lib/nginx/modules/ngx_stream_module.so ] && continue; pkg=libnginx-mod-stream ;;
    h2load|nghttp) pkg=nghttp2-client ;;
    iptables|iptables-restore) pkg=iptables ;;
    ip) pkg=iproute2 ;;
    systemd-analyze) pkg=systemd ;;
    chromedriver) pkg=chromium-driver ;;
    *) pkg=$tool ;;
  esac
  case " $missing " in *" $pkg "*) continue ;; esac
  missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing tools:$missing (install them, or run as root so this script can)" >&2
  exit 1
fi
echo "installing:$missing" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
