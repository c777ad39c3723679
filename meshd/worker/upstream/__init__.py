"""The upstream side of the data path: pooled HTTP/1.1 connections, HTTP/2 connections
and streams, TLS toward services, and ``exchange``: one attempt over either."""
