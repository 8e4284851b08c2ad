"""The daemon's optional web server: a local page (live preview, faces, events, health), a JSON API,
``/healthz`` and Prometheus ``/metrics``. The frame loop hands its results to :class:`edge.web.feed.Feed`
without waiting; HTTP threads only ever read from it (edge.web.server).
"""
