"""The sans-IO protocol cores of meshd: bytes or values in, values out; no sockets, ssl or gevent."""
