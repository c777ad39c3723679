#!/bin/sh
# A lab application VM: the demo app, a Consul agent registering it as service "demo",
# meshd (make install from the checkout, config for Consul discovery, an identity from
# the lab CA), a traffic loop.
# Usage: app.sh ROOT NAME BIND_IP CONSUL_SERVER_IP   (ROOT "/" on the VM)
# LAB_CA: the lab CA shared by the VMs (default: .lab-ca in the synced checkout);
# MESHD: the meshd command that makes it (tests give "python -m meshd").
ROOT=$1 NAME=$2 IP=$3 CONSUL_SERVER=$4
MESHD_SRC=${MESHD_SRC:-/vagrant}
LAB_CA=${LAB_CA:-$MESHD_SRC/.lab-ca}
MESHD=${MESHD:-/usr/local/bin/meshd}
TRUST_DOMAIN=lab.meshd
IDENTITY=spiffe://$TRUST_DOMAIN/service/demo
. "$(dirname "$0")/lib.sh"

apt_install curl unzip ca-certificates make python3-venv
consul_install
if on_vm; then
  make -C "$MESHD_SRC" install          # /opt/meshd, /usr/local/bin/meshd, the units
fi

# Consul agent (client mode) joining the server; meshd asks it on 127.0.0.1:8500.
put /etc/consul.d/consul.hcl 0644 <<EOF_HCL
datacenter = "lab"
data_dir = "/var/lib/consul"
node_name = "$NAME"
bind_addr = "$IP"
client_addr = "127.0.0.1"
retry_join = ["$CONSUL_SERVER"]
leave_on_terminate = true
EOF_HCL
# The demo app as a meshed instance: peers' meshd reach it over HTTP/2 on this VM's
# inbound port 4143 (meta meshd-inbound-port), expecting the identity its meshd presents
# (meta meshd-identity); the app itself listens on loopback only.
put /etc/consul.d/demo.json 0644 <<EOF_JSON
{
  "service": {
    "id": "demo-$NAME",
    "name": "demo",
    "address": "$IP",
    "port": 8080,
    "meta": { "meshd-inbound-port": "4143", "meshd-identity": "$IDENTITY" },
    "check": { "http": "http://127.0.0.1:8080/health", "interval": "2s", "timeout": "1s",
               "deregister_critical_service_after": "1m" }
  }
}
EOF_JSON
consul_unit

# Identity: each VM's meshd issues its own certificate for $IDENTITY (renewed every
# 16 h) from one lab CA. The first VM provisioned makes it (mkdir is the lock: vagrant-
# libvirt provisions VMs in parallel) and the others take it from the synced folder.
# A lab CA: its key lies in the clear in the checkout's .lab-ca/ (git-ignored).
if mkdir -m 0700 "$LAB_CA" 2>/dev/null; then
  made=$(mktemp -d)
  $MESHD ca init --dir "$made/ca" --trust-domain "$TRUST_DOMAIN" >/dev/null  # $MESHD: words
  cp "$made/ca/ca.crt" "$LAB_CA/ca.crt"
  cp "$made/ca/ca.key" "$LAB_CA/.ca.key.tmp"
  mv "$LAB_CA/.ca.key.tmp" "$LAB_CA/ca.key"          # last: its presence means "ready"
  rm -rf "$made"
fi
waited=0
while [ ! -f "$LAB_CA/ca.key" ]; do
  waited=$((waited + 1))
  if [ "$waited" -gt 120 ]; then
    echo "no lab CA in $LAB_CA after 120 s (a provisioning that died? remove it)" >&2
    exit 1
  fi
  sleep 1
done
# meshd checks that the CA directory and key are its own (0700, 0600): in the lab it runs
# as the system user meshd rather than systemd's dynamic user, which cannot own them.
install -d -m 0700 "$ROOT/etc/meshd/ca"
install -m 0600 "$LAB_CA/ca.key" "$ROOT/etc/meshd/ca/ca.key"
install -m 0644 "$LAB_CA/ca.crt" "$ROOT/etc/meshd/ca/ca.crt"
if on_vm; then
  id meshd >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin meshd
  chown -R meshd:meshd /etc/meshd/ca
fi
put /etc/systemd/system/meshd.service.d/lab-identity.conf 0644 <<UNIT
[Service]
# The lab CA in /etc/meshd/ca must belong to the user meshd runs as.
DynamicUser=no
User=meshd
Group=meshd
UNIT

# meshd's config for the lab (make install wrote the example only when there was none).
put /etc/meshd/meshd.toml 0644 <<EOF_TOML
# meshd on lab VM $NAME: services from the local Consul agent.
workers = 2
log_level = "info"

[admin]
listen = "127.0.0.1:4191"

[[discovery]]
name = "consul"
plugin = "consul"
address = "http://127.0.0.1:8500"

[[listener]]                     # the app (and the traffic loop) call http://demo/ here
name = "outbound"
listen = "127.0.0.1:4140"
protocol = "http"

[[listener]]                     # peers' meshd reach this VM's demo app here
name = "inbound"                 # mtls = "permissive" (the default with [identity]):
listen = "0.0.0.0:4143"          # mTLS from peers, plaintext still served and counted
direction = "inbound"
forward = "127.0.0.1:8080"

[identity]                       # a certificate from the lab CA (meshd ca), in memory
provider = "meshd-ca"
trust_domain = "$TRUST_DOMAIN"
dir = "/etc/meshd/ca"
service = "demo"                 # -> $IDENTITY

[service.demo]
timeout = "5s"
retries = 1
EOF_TOML

put /etc/systemd/system/demo-app.service 0644 <<UNIT
[Unit]
Description=meshd lab demo app (answers "$NAME PATH")

[Service]
DynamicUser=yes
ExecStart=/opt/meshd/bin/python -m meshd.testing.backend --listen 127.0.0.1:8080 --name $NAME
Restart=always

[Install]
WantedBy=multi-user.target
UNIT

put /etc/systemd/system/lab-traffic.service 0644 <<UNIT
[Unit]
Description=meshd lab traffic: 5 requests/s to http://demo/ through the local meshd
After=meshd.service

[Service]
DynamicUser=yes
ExecStart=/bin/sh -c 'while :; do curl -s -o /dev/null -H "Host: demo" http://127.0.0.1:4140/lab; sleep 0.2; done'
Restart=always

[Install]
WantedBy=multi-user.target
UNIT

start_units consul.service demo-app.service meshd.service lab-traffic.service
