#!/bin/sh
# `make install`: meshd and its in-tree plugins in a virtual environment at PREFIX, the
# command linked into BINDIR, the systemd units into UNITDIR, config/example.toml as
# SYSCONFDIR/meshd/meshd.toml when there is none yet.
#
#   PREFIX=/opt/meshd BINDIR=/usr/local/bin UNITDIR=/etc/systemd/system SYSCONFDIR=/etc
#   DESTDIR=            staging root for packagers: every file lands under DESTDIR, but
#                       every path written into a file is the final one (below)
#   PYTHON=python3      the interpreter the venv is made from (3.11 or newer)
#   PLUGINS="plugins/static plugins/consul plugins/kubernetes"
#
# Why a venv: Debian and Ubuntu refuse a system-wide `pip install` (externally managed),
# and a venv keeps meshd's dependencies apart from the system's.
#
# DESTDIR: a venv's scripts carry its absolute path (`#!/opt/meshd/bin/python`, and
# activate's VIRTUAL_ENV). The venv is made at DESTDIR/PREFIX, then every text file in
# its bin/ and pyvenv.cfg is rewritten from DESTDIR/PREFIX to PREFIX, and the bytecode
# is compiled again with PREFIX as its source path (tracebacks name the final files).
# The result runs only once moved to PREFIX; `DESTDIR/PREFIX/bin/python -m meshd`
# runs in place too (a venv's python finds its site-packages relative to itself).
#
# Wheels are built from a copy of the source tree (no stale build/ directory can leak
# removed modules into them) and installed, not linked: the checkout can go afterwards.
set -eu

PREFIX=${PREFIX:-/opt/meshd}
DESTDIR=${DESTDIR:-}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SYSCONFDIR=${SYSCONFDIR:-/etc}
PYTHON=${PYTHON:-python3}
PLUGINS=${PLUGINS:-plugins/static plugins/consul plugins/kubernetes}

case "$PREFIX" in /*) ;; *) echo "install.sh: PREFIX must be absolute: $PREFIX" >&2; exit 2 ;; esac
if [ -n "$DESTDIR" ]; then
  mkdir -p "$DESTDIR"
  DESTDIR=$(cd "$DESTDIR" && pwd)
fi
src=$(cd "$(dirname "$0")/.." && pwd)
venv="$DESTDIR$PREFIX"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
mkdir "$work/src" "$work/wheels"
tar -C "$src" -cf - \
  --exclude=./.git --exclude=./.venv --exclude='./.*_cache' --exclude=./.hypothesis \
  --exclude=build --exclude=dist --exclude='*.egg-info' --exclude=__pycache__ \
  --exclude=./bench-results --exclude=./.demo-state . | tar -C "$work/src" -xf -

[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
echo "install.sh: building wheels: meshd $PLUGINS" >&2
(cd "$work/src" && "$venv/bin/python" -m pip wheel -q --no-deps -w "$work/wheels" . $PLUGINS)
echo "install.sh: installing into $venv" >&2
"$venv/bin/python" -m pip install -q "$work"/wheels/*.whl
# Same version numbers as an earlier install: make sure this checkout's code is the one in.
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$work"/wheels/*.whl

if [ -n "$DESTDIR" ]; then
  for f in "$venv"/bin/* "$venv/pyvenv.cfg"; do
    [ -f "$f" ] && [ ! -L "$f" ] && grep -qI "$venv" "$f" || continue
    sed -i "s|$venv|$PREFIX|g" "$f"
  done
  find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
  "$venv/bin/python" -m compileall -q -j 0 -s "$DESTDIR" -p / "$venv/lib" >/dev/null
fi

mkdir -p "$venv/share/doc/meshd"
cp "$src/README.md" "$src/docs/plugins.md" "$src/config/example.toml" "$venv/share/doc/meshd/"

mkdir -p "$DESTDIR$BINDIR"
ln -sfn "$PREFIX/bin/meshd" "$DESTDIR$BINDIR/meshd"

mkdir -p "$DESTDIR$UNITDIR"
for unit in meshd.service meshd.socket; do
  sed -e "s|/usr/local/bin/meshd|$BINDIR/meshd|g" -e "s|/etc/meshd/|$SYSCONFDIR/meshd/|g" \
    -e "s|file:///opt/meshd/|file://$PREFIX/|g" \
    "$src/systemd/$unit" > "$DESTDIR$UNITDIR/$unit"
  chmod 0644 "$DESTDIR$UNITDIR/$unit"
done

mkdir -p "$DESTDIR$SYSCONFDIR/meshd"
if [ ! -e "$DESTDIR$SYSCONFDIR/meshd/meshd.toml" ]; then
  install -m 0644 "$src/config/example.toml" "$DESTDIR$SYSCONFDIR/meshd/meshd.toml"
  echo "install.sh: wrote $SYSCONFDIR/meshd/meshd.toml (from config/example.toml): edit it" >&2
else
  echo "install.sh: kept the existing $SYSCONFDIR/meshd/meshd.toml" >&2
fi

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
echo "install.sh: done. $BINDIR/meshd -> $PREFIX/bin/meshd; units in $UNITDIR" >&2
