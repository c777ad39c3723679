"""The master side: owns the listening sockets, the shared-memory region and the
process table; never imports gevent. ``arbiter`` is the loop, ``sockets`` binds and
inherits listeners, ``notify`` speaks systemd's sd_notify protocol."""
