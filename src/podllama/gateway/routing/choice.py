"""Which server a request goes to: by the route's capability and roles, the model it names, the media it carries
(image or audio parts need a server that can see or hear them), the role's default; server-scoped routes by
`?server=`/`?model=` or the conversation they follow. A conversation (X-Conversation-Id) is its key's alone."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ..front.auth import Caller
from .routes import CAPABILITY_ROLES, ENDPOINTS, Endpoint
from .upstreams import Registry

Why = tuple[int, str, str]  # (status, message, error type) of a refusal; (0, "", "") when a server was chosen
CONVERSATIONS = 10000  # remembered, the oldest forgotten first


class Chooser:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        # X-Conversation-Id → (server, the id of the key that started it): a stream is its key's alone
        self.conversations: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def listed(self, caller: Caller) -> str:
        """The servers CALLER may use, for a message (a scoped key hears of no others)."""
        return ", ".join(n for n, s in self.registry.servers.items() if caller.refusal(n, s) is None) or "none"

    def stream_of(self, conv: str, caller: Caller) -> str | None:
        """The server of conversation CONV when CALLER's key started it."""
        known = self.conversations.get(conv)
        return known[0] if known is not None and known[1] == caller.id else None

    def server_scoped(self, ep: Endpoint, query: dict[str, list[str]], caller: Caller, data: Any
                      ) -> tuple[str | None, Why]:
        if ep.name == "stream.follow" and query.get("conv_id"):
            known = self.stream_of(query["conv_id"][0], caller)
            if known is None:  # another key's stream, or none: llama-server would replay anyone's
                return None, (404, "no stream with that conv_id was started with this key", "")
            return known, (0, "", "")
        if ep.name == "stream.lookup":
            ids = data.get("conversation_ids") if isinstance(data, dict) else None
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                return None, (400, "stream lookup takes {\"conversation_ids\": [ids …]}", "")
            servers = {self.stream_of(i, caller) for i in ids}
            if None in servers or len(servers) != 1:
                return None, (404, "a conversation id was not started with this key (or on another server)", "")
            return servers.pop(), (0, "", "")
        name = next(iter(query.get("server", [])), None)
        if name is not None and name not in self.registry.servers:
            return None, (404, f"no server named '{name}'; servers: {self.listed(caller)}", "")
        model = next(iter(query.get("model", [])), None)
        if name is None and model is not None:
            name = self.registry.server_for_model(model)
            if name is None:
                return None, (404, f"model '{model}' not found; GET /v1/models lists them", "")
        if name is not None:
            section = self.registry.servers[name]
            if section.role not in ep.roles:
                return None, (400, f"server '{name}' runs {section.kind.program}, which has no {ep.paths[0]}", "")
            return name, (0, "", "")
        server = self.registry.default(CAPABILITY_ROLES["server"])
        return server, (503, "no servers are configured", "")

    def choose(self, ep: Endpoint, model: str | None, media: str | None) -> tuple[str | None, Why]:
        reg = self.registry
        roles = ep.roles
        if media and reg.servers_with_role((media,)):
            roles = (media,)  # image or audio parts: only a server that can see or hear them
        if model:
            server = reg.server_for_model(model)
            if server is not None:
                role = reg.servers[server].role
                if role in roles:
                    return server, (0, "", "")
                serves = sorted({p for e in ENDPOINTS if role in e.roles and e.scope == "model" for p in e.paths[:1]})
                return None, (400, f"model '{model}' is served by server '{server}' (role {role}), which cannot "
                              f"answer {ep.paths[0]}; it serves {', '.join(serves)}", "")
        server = reg.default(roles)
        if server is None:
            needed = " or ".join(f"'{r}'" for r in roles)
            return None, (501, f"no server here answers {ep.paths[0]}: it needs a server with role {needed}; add one "
                          "to services.toml", "not_supported_error")
        return server, (0, "", "")

    def claim(self, conv: str, server: str, caller: Caller) -> bool:
        """Conversation CONV (X-Conversation-Id) goes on with SERVER for CALLER's key; False when another key
        started it."""
        owner = self.conversations.get(conv)
        if owner is not None and owner[1] != caller.id:
            return False
        self.conversations[conv] = (server, caller.id)
        self.conversations.move_to_end(conv)
        while len(self.conversations) > CONVERSATIONS:
            self.conversations.popitem(last=False)
        return True
