"""A minimal StatusNotifierWatcher on the session bus, so the app's tray registers under Xvfb, plus helpers
to read the tray menu (com.canonical.dbusmenu) and click items by label. Runs its own asyncio loop in a
background thread; the test calls it synchronously."""
import asyncio
import threading

from dbus_next import Message, MessageType, PropertyAccess, Variant
from dbus_next.aio import MessageBus
from dbus_next.service import ServiceInterface, dbus_property, method, signal


class _Watcher(ServiceInterface):
    def __init__(self):
        super().__init__("org.kde.StatusNotifierWatcher")
        self.items = []

    @method()
    def RegisterStatusNotifierItem(self, service: "s"):  # noqa: F821
        pass

    @method()
    def RegisterStatusNotifierHost(self, service: "s"):  # noqa: F821
        pass

    @dbus_property(access=PropertyAccess.READ)
    def RegisteredStatusNotifierItems(self) -> "as":  # noqa: F821
        return self.items

    @dbus_property(access=PropertyAccess.READ)
    def IsStatusNotifierHostRegistered(self) -> "b":  # noqa: F821
        return True

    @dbus_property(access=PropertyAccess.READ)
    def ProtocolVersion(self) -> "i":  # noqa: F821
        return 0

    @signal()
    def StatusNotifierItemRegistered(self, s) -> "s":  # noqa: F821
        return s


class Tray:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.item = None  # (sender, path)
        self.ready = threading.Event()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._run(self._start())

    def _run(self, coro, timeout=20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self):
        self.bus = await MessageBus().connect()
        self.watcher = _Watcher()

        def snoop(msg):
            if msg.member == "RegisterStatusNotifierItem":
                svc = msg.body[0]
                self.item = (msg.sender, svc) if svc.startswith("/") else (svc, "/StatusNotifierItem")
                self.watcher.items.append(self.item[0] + self.item[1])
                self.ready.set()

        self.bus.add_message_handler(snoop)
        self.bus.export("/StatusNotifierWatcher", self.watcher)
        await self.bus.request_name("org.kde.StatusNotifierWatcher")

    async def _menu_path(self):
        sender, path = self.item
        r = await self.bus.call(Message(destination=sender, path=path, interface="org.freedesktop.DBus.Properties",
                                        member="Get", signature="ss", body=["org.kde.StatusNotifierItem", "Menu"]))
        if r.message_type == MessageType.ERROR:
            raise RuntimeError(f"tray item has no menu: {r.body}")
        return r.body[0].value

    async def _layout(self):
        sender, _ = self.item
        menu = await self._menu_path()
        r = await self.bus.call(Message(destination=sender, path=menu, interface="com.canonical.dbusmenu",
                                        member="GetLayout", signature="iias", body=[0, -1, []]))
        items = []

        def walk(node):
            _id, props, children = node
            if "label" in props:
                items.append({"id": _id, "label": props["label"].value,
                              "toggle": props["toggle-state"].value if "toggle-state" in props else None,
                              "enabled": props["enabled"].value if "enabled" in props else True})
            for c in children:
                walk(c.value)

        walk(r.body[1])
        return menu, items

    def items(self):
        assert self.ready.wait(30), "the tray never registered with the StatusNotifierWatcher"
        return self._run(self._layout())[1]

    def labels(self):
        return [i["label"] for i in self.items()]

    def click(self, label):
        async def go():
            menu, items = await self._layout()
            match = [i for i in items if i["label"] == label or i["label"].startswith(label)]
            if not match:
                raise KeyError(f"no tray item {label!r} in {[i['label'] for i in items]}")
            await self.bus.call(Message(destination=self.item[0], path=menu, interface="com.canonical.dbusmenu",
                                        member="Event", signature="isvu",
                                        body=[match[0]["id"], "clicked", Variant("s", ""), 0]))
        assert self.ready.wait(30)
        self._run(go())
