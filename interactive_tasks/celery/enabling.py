"""``enable(app)``: turn the bridge on for one Celery app, in clients and workers alike."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from ..app import App
from ..errors import ConfigurationError
from ..transport import kombu_transports

# A Celery app on embedded:// or memory:// makes its own kombu connections (to send a
# task, in its worker): the bridge enters those schemes in kombu's table when imported.
# Celery imports kombu anyway; the library itself leaves it to the connection.
kombu_transports()

#: the attribute of a Celery app that holds its bridge settings and interactive_tasks App
_ATTRIBUTE = "_itask_bridge"
_lock = threading.Lock()
_signal_connected = False


class _Bridge:
    """What ``enable`` recorded for one Celery app; the App is made on first use, because
    a Celery app's broker is often configured after the module that calls ``enable``."""

    def __init__(self, celery_app: Celery, settings: dict[str, Any]) -> None:
        self.celery_app = celery_app
        self.settings = settings
        self.app: App | None = None

    def itask_app(self) -> App:
        if self.app is None:
            with _lock:
                if self.app is None:
                    conf = self.celery_app.conf
                    url = conf.broker_url or self.celery_app.connection_for_write().as_uri(
                        include_password=True)
                    settings = dict(self.settings)
                    backend = settings.pop("result_backend", None)
                    celery_backend = conf.result_backend
                    if backend is None and isinstance(celery_backend, str) and \
                            celery_backend.startswith(("redis://", "rediss://")):
                        # Final snapshots (for attach after the end) beside Celery's
                        # results, also when the broker keeps none (RabbitMQ).
                        backend = celery_backend
                    self.app = App(self.celery_app.main or "celery", broker=url,
                                   result_backend=backend, **settings)
        return self.app


def enable(app: Celery, **settings: Any) -> None:
    """Let ``app``'s tasks with ``base=InteractiveTask`` be watched and steered.

    Adds a bootstep to ``celery -A proj worker`` that runs the relay in Celery's main
    process and gives each pool process a channel to it. ``settings`` are
    interactive_tasks settings (``namespace``, ``secret``, ``subscription_ttl`` ...); the
    broker is the Celery app's; ``result_backend`` (where final snapshots are kept for
    attach) defaults to Celery's result backend when that is Redis. Calling it again
    replaces the settings. Raises :class:`~interactive_tasks.errors.ConfigurationError`
    for an unknown setting.
    """
    global _signal_connected
    from ..app import _SETTING_NAMES

    unknown = set(settings) - _SETTING_NAMES - {"result_backend"}
    if unknown:
        raise ConfigurationError(f"unknown setting(s) {', '.join(sorted(unknown))}")
    from .bootstep import RelayStep, connect_pool_process

    bridge = _Bridge(app, dict(settings))
    setattr(app, _ATTRIBUTE, bridge)
    # what `itask -A proj` looks for (interactive_tasks.app.load_app)
    app.interactive_tasks_app = bridge.itask_app
    if RelayStep not in app.steps["worker"]:
        app.steps["worker"].add(RelayStep)
    with _lock:
        if not _signal_connected:
            # prefork: each child registers its own channel as it starts
            worker_process_init.connect(connect_pool_process, weak=False)
            _signal_connected = True


def bridge_app(app: Celery) -> App:
    """The interactive_tasks :class:`~interactive_tasks.App` that speaks for ``app``
    (same broker); ``itask attach``/``top`` use it. Raises ConfigurationError when
    ``enable(app)`` was not called."""
    bridge = getattr(app, _ATTRIBUTE, None)
    if not isinstance(bridge, _Bridge):
        raise ConfigurationError(
            f"Celery app {app.main!r} is not bridged: call "
            "interactive_tasks.celery.enable(app) where the app is made")
    return bridge.itask_app()


def is_enabled(app: Celery) -> bool:
    return isinstance(getattr(app, _ATTRIBUTE, None), _Bridge)
