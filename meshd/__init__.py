"""meshd: a service-mesh data plane on gevent for VMs and Kubernetes pods."""

__version__ = "0.1.0"
