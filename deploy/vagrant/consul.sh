#!/bin/sh
# The lab's Consul server. Usage: consul.sh ROOT BIND_IP   (ROOT "/" on the VM)
ROOT=$1 IP=$2
. "$(dirname "$0")/lib.sh"

apt_install curl unzip ca-certificates
consul_install
put /etc/consul.d/consul.hcl 0644 <<EOF_HCL
datacenter = "lab"
data_dir = "/var/lib/consul"
server = true
bootstrap_expect = 1
bind_addr = "$IP"
client_addr = "0.0.0.0"
ui_config {
  enabled = true
}
EOF_HCL
consul_unit
start_units consul.service
