"""Fault injection under load (``make chaos``) and a soak (``make soak``) for meshd.

``chaos.run``: a seeded scheduler (``chaos.faults``) injects worker kills and stops, HUP
storms, a USR2 upgrade, a killed control process, endpoint faults and a discovery outage
while ``chaos.load`` drives HTTP/1.1, HTTP/2 and opaque TCP clients through one meshd (or
two: client -> outbound -> inbound -> endpoint); ``chaos.report`` attributes each failure
to the fault that owned it and measures latency and recovery around each fault;
``chaos.scrape`` finds counters that went backwards. ``chaos.soak``: sustained load with
connection churn and HTTP/2 bursts, RSS and fds of every meshd process sampled.

Loopback only, bounded in time; every process started is stopped by pid.
"""
