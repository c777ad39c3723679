# Shared by consul.sh and app.sh (sourced). ROOT is the root they write under: "/" on a
# lab VM, a temporary directory in tests/test_vagrant.py, where only files are written
# (nothing is downloaded, installed or started).
set -eu
CONSUL_VERSION=${CONSUL_VERSION:-1.17.3}
ROOT=${ROOT%/}                       # "/" -> "", so "$ROOT/etc/..." is "/etc/..."

on_vm() { [ -z "$ROOT" ]; }

# put PATH MODE: stdin to $ROOT/PATH
put() {
  mkdir -p "$(dirname "$ROOT$1")"
  cat > "$ROOT$1"
  chmod "$2" "$ROOT$1"
}

apt_install() {
  on_vm || return 0
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The consul binary from HashiCorp's releases (Debian does not package it).
consul_install() {
  on_vm || return 0
  if ! /usr/local/bin/consul version 2>/dev/null | grep -q "v$CONSUL_VERSION"; then
    url="https://releases.hashicorp.com/consul/$CONSUL_VERSION/consul_${CONSUL_VERSION}_linux_amd64.zip"
    curl -fsSL -o /tmp/consul.zip "$url"
    unzip -o -q /tmp/consul.zip consul -d /usr/local/bin
    rm -f /tmp/consul.zip
  fi
  id consul >/dev/null 2>&1 || useradd --system --home /var/lib/consul --shell /usr/sbin/nologin consul
  install -d -o consul -g consul -m 0750 /var/lib/consul
}

consul_unit() {
  put /etc/systemd/system/consul.service 0644 <<UNIT
[Unit]
Description=Consul agent (meshd lab)
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
User=consul
Group=consul
ExecStart=/usr/local/bin/consul agent -config-dir=/etc/consul.d
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
UNIT
}

start_units() {
  on_vm || return 0
  systemctl daemon-reload
  for unit in "$@"; do
    systemctl enable "$unit"
    systemctl restart "$unit"
  done
}
