"""The daemon's log: one file in the cache directory, rotated by the daemon past
``HYPATIA_LOG_MAX_BYTES`` and shared with its worker processes, which reopen it after a rotation."""

from __future__ import annotations

import logging
import logging.handlers
import sys

from hypatia.config import Config

LOG_BACKUPS = 3  # rotated logs kept beside hypatiad.log: .1 (newest) to .3


def configure_logging(config: Config, to_stderr: bool, worker: bool = False) -> None:
    """Log to ``config.log_path`` (and stderr with ``to_stderr``). The daemon rotates the file;
    a worker only appends, reopening the file when the daemon has rotated it. A log file that
    cannot be opened (a read-only or full cache directory) leaves the log on stderr, said once."""
    handlers: list[logging.Handler] = []
    problem = None
    try:
        handlers.append(logging.handlers.WatchedFileHandler(config.log_path) if worker else
                        logging.handlers.RotatingFileHandler(config.log_path, maxBytes=config.log_max_bytes,
                                                             backupCount=LOG_BACKUPS))
    except OSError as exc:
        problem = f"cannot write the log file {config.log_path} ({exc.strerror}); logging to stderr only"
        to_stderr = True
    if to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=getattr(logging, config.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        handlers=handlers,
        force=True,
    )
    if problem:
        logging.getLogger("hypatia.daemon").warning(problem)
    # egglog logs every command of every program at INFO (tens of KB per plan); the log is for
    # the daemon's own story unless debugging is asked for.
    if config.log_level != "DEBUG":
        logging.getLogger("egglog").setLevel(logging.WARNING)
