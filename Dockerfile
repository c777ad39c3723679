# meshd and its in-tree discovery plugins on a slim Python base, installed as `make
# install` does (a venv, pip install . plugins/...), running as the non-root uid 2102
# that `meshd iptables` exempts from redirection. `meshd inject` runs this image twice
# per pod: as the sidecar (uid 2102) and as the init container (root, NET_ADMIN and
# NET_RAW only) that applies the rules with the iptables installed here.
#
#   docker build -t meshd:0.1.0 .
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*

COPY . /src
RUN python -m venv /opt/meshd \
 && /opt/meshd/bin/pip install --no-cache-dir /src /src/plugins/static /src/plugins/consul \
      /src/plugins/kubernetes \
 && rm -rf /src \
 && ln -s /opt/meshd/bin/meshd /usr/local/bin/meshd \
 && groupadd --system --gid 2102 meshd \
 && useradd --system --uid 2102 --gid 2102 --no-create-home --shell /usr/sbin/nologin meshd

USER 2102:2102
# outbound, inbound, admin (loopback in the shipped config), probes
EXPOSE 4140 4143 4191 4192
ENTRYPOINT ["meshd"]
CMD ["run", "-c", "/etc/meshd/meshd.toml"]
