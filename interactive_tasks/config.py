"""Celery-style configuration: ``app.config_from_object`` and ``app.autodiscover_tasks``.

A Celery project's ``celeryconfig.py`` (or Django settings with ``namespace="CELERY"``)
names settings the Celery way; :func:`translate` turns them into this project's, so the
same file loads unchanged where the settings mean the same, and a setting that cannot
mean the same here is refused with one line saying what to use instead.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .app import App

logger = logging.getLogger("interactive_tasks.config")

#: Celery's name -> this project's, where the meaning is the same
RENAMED = {
    "task_acks_late": "acks_late",
    "task_reject_on_worker_lost": "reject_on_worker_lost",
    "worker_prefetch_multiplier": "prefetch_multiplier",
}

#: content types that mean pickle (Celery's ``accept_content`` accepts both forms)
PICKLE = frozenset({"pickle", "application/x-python-serialize"})
#: serializers whose values msgpack carries (json's are a subset)
PLAIN = frozenset({"json", "msgpack", "application/json", "application/x-msgpack"})

#: accepted and without effect here, with the reason
NO_EFFECT = {
    "enable_utc": "times travel as epoch seconds (UTC) already",
    "task_track_started": "a started task is always reported (state running)",
    "result_extended": "the stored result always has the task's name, worker and times",
    "result_serializer": "results are msgpack",
    "result_accept_content": "results are msgpack",
    "broker_connection_retry": "workers and clients always reconnect",
    "broker_connection_retry_on_startup": "workers and clients always reconnect",
    "worker_hijack_root_logger": "logging is set by `itask worker -l`",
    "task_send_sent_event": "clients publish no events (task-received is the first)",
    "task_create_missing_queues": "queues are always declared when first used",
    "task_ignore_result": "results are always kept for result_expires",
    "result_persistent": "results are kept as the result store keeps them",
    "broker_pool_limit": "each process keeps its own few connections",
    "broker_connection_timeout": "connections are given 5 s",
}

#: prefixes of Celery's setting names: an unknown name with one is a setting this project
#: does not know (refused); other unknown names are a config file's own variables
CELERY_PREFIXES = ("broker_", "result_", "task_", "worker_", "beat_", "event_", "control_",
                   "security_", "redis_", "database_", "cache_", "mongodb_", "cassandra_",
                   "elasticsearch_", "s3_", "azureblockblob_", "email_", "couchbase_",
                   "arangodb_", "cosmosdbsql_", "couchdb_", "filesystem_")

#: Celery settings that cannot mean the same here: what to do instead
UNSUPPORTED = {
    "task_always_eager": "call the task directly (task(…)) to run it in-process",
    "task_queues": "queues are declared from task_routes and `itask worker -Q`",
    "task_default_exchange": "queues are named by task_routes / task_default_queue",
    "task_default_routing_key": "queues are named by task_routes / task_default_queue",
    "worker_concurrency": "pass -c to `itask worker`",
    "worker_pool": "pass -P to `itask worker`",
    "worker_max_tasks_per_child": "pass --max-tasks-per-child to `itask worker`",
    "worker_max_memory_per_child": "pass --max-memory-per-child to `itask worker`",
    "task_compression": "messages are not compressed; pass references to large data",
    "result_compression": "results are not compressed",
    "task_default_priority": "pass priority= when sending",
}


def settings_of(obj: Any, namespace: str | None = None) -> dict[str, Any]:
    """The settings an object, module, module name (``"proj.celeryconfig"``,
    ``"proj.settings:Config"``) or mapping holds, under ``namespace`` if given
    (``namespace="CELERY"`` reads ``CELERY_BROKER_URL`` as ``broker_url``).

    Raises ConfigurationError when a module or attribute named cannot be imported.
    """
    if isinstance(obj, str):
        obj = _import_object(obj)
    if isinstance(obj, Mapping):
        items = dict(obj)
    else:
        items = {name: getattr(obj, name) for name in dir(obj) if not name.startswith("_")}
    found: dict[str, Any] = {}
    prefix = f"{namespace}_" if namespace else ""
    for name, value in items.items():
        if not isinstance(name, str) or not name.startswith(prefix):
            continue
        if isinstance(value, ModuleType) or callable(value):
            continue  # `import os`, a class or function the config uses: not settings
        key = name[len(prefix):]
        if namespace:
            key = key.lower()
        elif key != key.lower():
            continue  # without a namespace only lowercase names are settings (Celery 4+)
        found[key] = value
    return found


def _import_object(path: str) -> Any:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"config_from_object: cannot import {module_name!r}: "
                                 f"{exc}") from exc
    if not attribute:
        return module
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"config_from_object: {module_name!r} has no "
                                 f"{attribute!r}") from None


def translate(app: App, found: dict[str, Any], namespace: str | None = None
              ) -> dict[str, Any]:
    """Apply Celery-named settings to ``app``; returns the settings for ``configure``.

    Without a ``namespace``, a name that is neither a setting here nor shaped like one
    of Celery's (``task_…``, ``broker_…`` …) is the file's own variable and is ignored.
    Raises ConfigurationError naming every setting that cannot apply and why.
    """
    from .app import _SETTING_NAMES

    settings: dict[str, Any] = {}
    problems: list[str] = []
    accept = {str(c) for c in found.get("accept_content") or ()}
    allow_pickle = bool(found.get("allow_pickle")) or bool(accept & PICKLE)
    for name, value in found.items():
        target = RENAMED.get(name, name)
        if name == "broker_url" or name == "broker":
            app.broker_url = value
        elif name == "result_backend":
            app.use_result_backend(value)
        elif name == "task_routes":
            settings["task_routes"] = routes(value)
        elif name == "result_expires" and isinstance(value, timedelta):
            settings["result_expires"] = value.total_seconds()
        elif name == "task_serializer":
            if str(value) in PICKLE and not allow_pickle:
                problems.append("task_serializer='pickle': pickle is refused unless "
                                "allowed (accept_content with 'pickle', or allow_pickle=True); "
                                "messages sent from here are msgpack either way")
            elif str(value) not in PLAIN | PICKLE:
                problems.append(f"task_serializer={value!r}: messages are msgpack; "
                                "use 'json' or 'msgpack'")
        elif name == "accept_content":
            unknown = accept - PLAIN - PICKLE
            if unknown:
                problems.append(f"accept_content {sorted(unknown)}: workers accept msgpack "
                                "(and pickle with allow_pickle)")
            if accept & PICKLE:
                settings["allow_pickle"] = True
        elif name == "task_annotations":
            app.annotate(value)
        elif name == "task_default_rate_limit":
            if value is not None:
                app.annotate({"*": {"rate_limit": value}})
        elif name in ("imports", "include"):
            names = [value] if isinstance(value, str) else list(value or ())
            app.autodiscover_modules(names)
        elif name == "beat_schedule":
            app.beat_schedule.update(beat_schedule(value, found.get("timezone")))
        elif name == "timezone":
            continue  # applies to the crontab entries of beat_schedule, above
        elif name in NO_EFFECT:
            logger.debug("setting %s has no effect here: %s", name, NO_EFFECT[name])
        elif name in UNSUPPORTED:
            problems.append(f"{name}: {UNSUPPORTED[name]}")
        elif target in _SETTING_NAMES:
            settings[target] = value
        elif namespace or name.startswith(CELERY_PREFIXES):
            problems.append(f"{name}: unknown setting")
        else:
            logger.debug("config_from_object: %s is not a setting; ignored", name)
    if problems:
        raise ConfigurationError("config_from_object: " + "; ".join(problems))
    return settings


def routes(value: Any) -> dict[str, str]:
    """Celery's ``task_routes`` as name (or glob) -> queue: a mapping whose values are a
    queue name or ``{"queue": name, …}``, or a list of such mappings (the first match
    wins). Raises ConfigurationError for a router function or a route without a queue."""
    maps = [value] if isinstance(value, Mapping) else list(value or ())
    result: dict[str, str] = {}
    for mapping in maps:
        if not isinstance(mapping, Mapping):
            raise ConfigurationError(
                f"task_routes: {mapping!r} is not a mapping; routes map task names (or "
                "globs) to a queue name or {'queue': name} (router functions are not "
                "supported)")
        for pattern, route in mapping.items():
            queue = route.get("queue") if isinstance(route, Mapping) else route
            if not isinstance(queue, str) or not queue:
                raise ConfigurationError(
                    f"task_routes[{pattern!r}]: {route!r} names no queue; routes map to a "
                    "queue name or {'queue': name} (exchange and routing_key have no "
                    "meaning here)")
            result.setdefault(str(pattern), queue)
    return result


def beat_schedule(value: Mapping[str, Any], timezone: str | None) -> dict[str, Any]:
    """Celery's ``beat_schedule``: ``timedelta`` schedules become seconds, and crontab
    entries that name no zone take ``timezone`` (Celery's setting) when it is given."""
    from .schedules import crontab

    entries: dict[str, Any] = {}
    for name, entry in dict(value).items():
        entry = dict(entry) if isinstance(entry, Mapping) else entry
        if isinstance(entry, dict):
            schedule = entry.get("schedule")
            if isinstance(schedule, timedelta):
                entry["schedule"] = schedule.total_seconds()
            elif timezone and isinstance(schedule, crontab) and schedule.tz is None:
                entry["schedule"] = crontab.parse(schedule._text, tz=timezone)
            elif timezone and isinstance(schedule, str):
                entry["schedule"] = crontab.parse(schedule, tz=timezone)
        entries[name] = entry
    return entries


def discover(packages: Iterable[str] | Callable[[], Iterable[str]] | None,
             related_name: str | None) -> list[str]:
    """Import ``<package>.<related_name>`` for each package; a package without that
    module is skipped. With ``related_name`` None each name is a module to import, and a
    missing one raises. ``packages`` may be a callable (Celery's ``lambda:
    settings.INSTALLED_APPS``); None means Django's ``INSTALLED_APPS``. Returns the
    modules imported. An error raised inside a module that exists propagates."""
    if packages is None:
        packages = _django_apps()
    elif callable(packages):
        packages = packages()
    imported: list[str] = []
    for package in packages:
        name = f"{package}.{related_name}" if related_name else str(package)
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name is not None and (name == exc.name or
                                                name.startswith(exc.name + "."))
            if related_name and missing:
                continue  # this package has no such module: nothing to discover
            raise ConfigurationError(f"cannot import {name!r}: {exc}") from exc
        imported.append(name)
    return imported


def _django_apps() -> list[str]:
    """The names of Django's installed apps; Django is set up first when it is not yet
    (a worker started with ``-A proj``, as Celery's Django fix-up does)."""
    try:
        import django  # type: ignore[import-not-found,unused-ignore]
        from django.apps import apps  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ConfigurationError("autodiscover_tasks() without packages needs Django "
                                 "(its INSTALLED_APPS); pass the packages") from None
    if not apps.ready:
        try:
            django.setup()
        except Exception as exc:  # ImproperlyConfigured: no DJANGO_SETTINGS_MODULE …
            raise ConfigurationError(f"autodiscover_tasks(): Django cannot start: {exc}; "
                                     "set DJANGO_SETTINGS_MODULE (proj/celery.py does it "
                                     "in Celery's layout) or pass the packages") from exc
    return [config.name for config in apps.get_app_configs()]
