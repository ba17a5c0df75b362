"""The test harness: real parts started on loopback for each test or session, and fakes for unit tests.

- ``lifecycle``: start and stop threaded servers and child processes (free ports, readiness, termination).
- ``registry``, ``registry_fixtures``: CNCF distribution (plain or TLS, also as a pull-through mirror), behind
  ``proxy`` (counting, fault-injecting: corrupt, throttle, cut, statuses with Retry-After);
  ``token_server``, ``token_fixtures``, ``jwt_signing``, ``bearer_client``: a registry with bearer-token auth;
  ``rogue_registry``: one that lies about what it holds, or drips, bloats and redirects.
- ``tls``: a test CA and the certificates it issues, or self-signed ones (``cryptography``);
  ``forward_proxy``: an outbound CONNECT / absolute-URI proxy that maps names to loopback (the test's DNS).
- ``services``, ``service_fixtures``, ``redis_server``: redis-server (restartable with its data), dockerd, the
  project's server and workers, the ``stack`` fixture (``start_stack`` outside pytest).
- ``images``, ``pushing``: test images built in memory and pushed; ``sha()``.
- ``downloads``, ``faults``: download like a switch and check what came back.
- ``rawhttp``, ``flood``, ``fuzz``: hostile clients over bare sockets (malformed, slow, idle, fuzzed requests),
  a server held to few file descriptors, and the server's memory and descriptors from /proc.
- ``job_faults``: which worker runs a job, what a dead one left behind, a small volume that fills up.
- ``fake_registry``: an in-memory registry behind httpx.MockTransport for unit tests.
- ``asgi``, ``spans``: the app in this process, spans in memory; ``otlp_receiver``: a real OTLP collector.
- ``testdata``, ``make_testdata``: the fixture files in testdata/ and how they were made.
- ``base_image``, ``deploy``, ``deploy_fixtures``: the project's container images, built on a local debootstrap
  base (cached) through the offline wheelhouse path; ``keda_schema``: KEDA's own schema for the ScaledObject.
"""
