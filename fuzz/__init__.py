"""Coverage-guided fuzz targets over meshd's sans-IO protocol cores (``make fuzz``).

One module per core, each with ``one_input(data: bytes)``: it decodes the fuzzer's bytes
into calls on the core and asserts invariants (only meshd's own error types escape,
parsed heads round-trip, translations pass the other side's checks, detection decisions
never change as bytes arrive). A failed assertion or a foreign exception is a crash.

- ``fuzz_http1``: HTTP/1.1 request heads, response heads, chunked bodies.
- ``fuzz_h2_headers``: HTTP/2 header rules and the H2<->H1 request translations.
- ``fuzz_hpack``: meshd's HPACK decoder (against the hpack package's) and encoder.
- ``fuzz_detect``: protocol detection, tunnel lines, ClientHello peeking.

``fuzz/run.py`` runs them under atheris (libFuzzer) for a bounded time each; the seed
corpus is ``fuzz/corpus/<target>/`` (made by ``fuzz/seeds.py``). tests/test_fuzz_targets.py
runs every ``one_input`` over its seeds without atheris, so the targets cannot rot.
"""

TARGETS = ("http1", "h2_headers", "hpack", "detect")
