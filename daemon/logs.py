"""The daemon's log: one file in the cache directory, shared by the daemon and its workers."""

from __future__ import annotations

import logging

from hypatia.config import Config


def configure_logging(config: Config, to_stderr: bool) -> None:
    handlers: list[logging.Handler] = [logging.FileHandler(config.log_path)]
    if to_stderr:
        handlers.append(logging.StreamHandler())
    logging.basicConfig(
        level=getattr(logging, config.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        handlers=handlers,
        force=True,
    )
    # egglog logs every command of every program at INFO (tens of KB per plan); the log is for
    # the daemon's own story unless debugging is asked for.
    if config.log_level != "DEBUG":
        logging.getLogger("egglog").setLevel(logging.WARNING)
