"""The dashboard's parts, built once from the config and started and stopped together."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from .access import Access
from .alarms import AlarmBook
from .auth import Sessions, Users, load_session_key
from .config import UiConfig
from .drops import Drops
from .feed import Feed
from .history import HistoryReader
from .hub import Hub
from .labels import Labeller
from .state import LineState
from .store import Store

log = logging.getLogger(__name__)


@dataclass
class Dashboard:
    """Everything one `lineguard-ui` process runs: store, state, alarm book, live hub, broker feed, access."""

    config: UiConfig
    drops: Drops
    store: Store
    state: LineState
    book: AlarmBook
    hub: Hub
    feed: Feed
    labeller: Labeller
    access: Access
    history: HistoryReader

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind live updates to the web server's loop, then subscribe (the broker may still be down)."""
        self.hub.bind(loop)
        self.feed.start()

    def close(self) -> None:
        self.feed.close()
        self.store.close()
        log.info("stopped; dropped inputs by kind: %s", self.drops.totals() or "none")


def build(config: UiConfig) -> Dashboard:
    """Open the store and read the users file, session key and label key; their errors name the file and fix.

    Raises StoreError, AuthError, LabelRefused (an unreadable label key) or MqttError (TLS files).
    """
    drops = Drops()
    store = Store(config.database, config.store, drops)
    users = Users(config.auth.users_file)
    sessions = Sessions(load_session_key(config.state_dir / "session.key"), lifetime_s=config.auth.session_hours * 3600)
    book = AlarmBook(store.open_alarms(), store.next_alarm_id(), store.save_alarm)
    state = LineState()
    state.remember_model_events(list(reversed(store.pushes(limit=1000))))
    hub = Hub(max_clients=config.http.max_clients, client_queue=config.http.client_queue, drops=drops)
    feed = Feed(config, state, store, book, hub, drops)
    labeller = Labeller(config.label_key, store, feed.send_label)
    feed.labeller = labeller
    access = Access(config.auth, users, sessions)
    if not len(users) and not config.auth.proxy_header:
        log.info("no users file and no proxy header: the page is read-only (nobody can label or acknowledge)")
    return Dashboard(config, drops, store, state, book, hub, feed, labeller, access, HistoryReader(store))
