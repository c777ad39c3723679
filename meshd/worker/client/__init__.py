"""The client side of the data path: what reads a client's connection (HTTP/1.1, HTTP/2
connection and streams, protocol detection, opaque TCP) and translates each request into
a ``meshd.worker.call.Call`` and the response back."""
