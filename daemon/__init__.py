"""hypatiad: the per-host daemon (server loop, handlers, single-flight, stats) and hypatia-ctl."""
