"""The master side: owns the listening sockets, the shared-memory regions and the
process table; never imports gevent. ``arbiter`` is the loop, ``regions`` keeps each
config generation's shared-memory region, ``sockets`` binds and inherits listeners,
``spawn`` forks a child, ``notify`` speaks systemd's sd_notify protocol."""
