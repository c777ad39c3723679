"""A worker process: the gevent data path (accept loops, HTTP/1.1 and HTTP/2 proxying,
tunnels, balancing, upstream pools). ``process`` is the entry point the master forks
into; it patches the standard library before anything else is imported."""
