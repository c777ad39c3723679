"""Who is on the other end of a client connection, as far as meshd can tell.

An inbound listener with ``mtls`` other than "off" terminates TLS from peer meshds
(``meshd.worker.client.inbound_tls``); the verified client certificate's SPIFFE ID is the
peer's ``client_id``. Every handler of a client connection (HTTP/1.1, HTTP/2, opaque TCP,
a peer's tunnel) gets the connection's ``Peer``: authorization, metric labels and logs
read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Peer:
    tls: bool = False       # the connection was TLS that meshd terminated
    client_id: str = ""     # the SPIFFE ID of the verified client certificate; "" none

    @property
    def authenticated(self) -> bool:
        return bool(self.client_id)


PLAINTEXT = Peer()
