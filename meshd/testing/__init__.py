"""What meshd ships for tests (its own and plugin authors'): a demo/test HTTP backend
and helpers to run meshd as a real process on loopback, and a scripted TCP peer
(tcp_server.TcpServer)."""
