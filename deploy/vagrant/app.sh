#!/bin/sh
# A lab application VM: the demo app, a Consul agent registering it as service "demo",
# meshd (make install from the checkout, config for Consul discovery), a traffic loop.
# Usage: app.sh ROOT NAME BIND_IP CONSUL_SERVER_IP   (ROOT "/" on the VM)
ROOT=$1 NAME=$2 IP=$3 CONSUL_SERVER=$4
MESHD_SRC=${MESHD_SRC:-/vagrant}
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
# inbound port 4143 (meta meshd-inbound-port); the app itself listens on loopback only.
put /etc/consul.d/demo.json 0644 <<EOF_JSON
{
  "service": {
    "id": "demo-$NAME",
    "name": "demo",
    "address": "$IP",
    "port": 8080,
    "meta": { "meshd-inbound-port": "4143" },
    "check": { "http": "http://127.0.0.1:8080/health", "interval": "2s", "timeout": "1s",
               "deregister_critical_service_after": "1m" }
  }
}
EOF_JSON
consul_unit

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
name = "inbound"
listen = "0.0.0.0:4143"
direction = "inbound"
forward = "127.0.0.1:8080"

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
