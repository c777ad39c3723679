"""A worker process: the gevent data path.

The path of one connection: ``process.Worker`` accepts it on a shared listening socket
and ``serve.serve_connection`` decides who serves it (tcp, auto detection, HTTP/1.1,
or HTTP/2 by its preface). The client side (``client``) reads requests:
``client.http1.HttpConnection`` for HTTP/1.1, ``client.h2_server`` for an HTTP/2
connection and ``client.h2_stream`` for each of its streams, ``client.tcp`` and
``client.auto`` for opaque bytes and detection. Each request becomes a ``call.Call``:
routed (``routing``), balanced (``balancer``), and attempted until one attempt ends or
the retry rules (``retries``, ``meshd.balance.retry``) stop it; each attempt is an
``upstream.exchange.UpstreamExchange`` over a pooled connection of the upstream side
(``upstream.http1`` for HTTP/1.1, ``upstream.h2`` and ``upstream.h2_pool`` for HTTP/2
streams, ``upstream.tls`` for TLS toward services); the client side sends the request
body and relays the response through the exchange, whatever the upstream speaks (the
exchange frames the one and translates the other). ``tunnel`` copies bytes after an
upgrade or CONNECT and for opaque TCP; ``sockio`` holds the socket helpers.

The handlers see the worker as a ``context.Context``; only ``entry`` (what the
master forks into: it patches the standard library, then runs ``process.main``) and
``process`` know the worker class.
"""
