"""nginx as a test upstream: one nginx process (no daemon, no master process, one worker)
on a loopback port, serving one ``server`` block that the test describes by its
``listen`` parameters, extra server lines and the body of ``location /``. Its files
(config, error log, pid, temp paths) live in a folder of its own under the test's
directory, so tests running in parallel never share one.

    server = Nginx(tmp_path, "http2", 'return 200 "$server_protocol\\n";').start()
    ... f"127.0.0.1:{server.port}" ...
    server.stop()

`make test` installs nginx (scripts/ensure-tools.sh); without it, ``start`` fails the
test with a message that says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

from meshd.testing.harness import free_port, port_open, terminate, wait_for

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class Nginx:
    """One nginx: ``listen 127.0.0.1:PORT {listen};``, ``server_lines``, and
    ``location / { location }``. ``port`` defaults to a free one."""

    def __init__(self, workdir: Path, listen: str, location: str, *, server_lines: str = "",
                 port: int | None = None, worker_connections: int = 256) -> None:
        self.port = port or free_port()
        self.dir = workdir / f"nginx-{self.port}"
        self.dir.mkdir()
        temp = "".join(f"  {k}_temp_path {self.dir}/{k};\n" for k in TEMP_PATHS)
        server = textwrap.indent(server_lines.strip() + "\n", " " * 4) if server_lines else ""
        (self.dir / "nginx.conf").write_text(
            "daemon off;\n"
            "master_process off;\n"
            "worker_processes 1;\n"
            f"error_log {self.dir}/error.log;\n"
            f"pid {self.dir}/nginx.pid;\n"
            f"events {{ worker_connections {worker_connections}; }}\n"
            "http {\n"
            "  access_log off;\n"
            f"{temp}"
            "  server {\n"
            f"    listen 127.0.0.1:{self.port} {listen};\n"
            f"{server}"
            "    location / {\n"
            f"{textwrap.indent(location.strip(), ' ' * 6)}\n"
            "    }\n"
            "  }\n"
            "}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        assert NGINX is not None, "nginx is not installed (make test installs nginx-light)"
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.dir), "-e", str(self.dir / "error.log"),
             "-c", str(self.dir / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.dir / 'error.log').read_text()}")
            return port_open("127.0.0.1", self.port)
        wait_for(up, 10, what="nginx")
        return self

    def stop(self) -> None:
        terminate(self.proc)
