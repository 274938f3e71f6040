"""From services.toml to running containers: specs (spec.py), plans (plan.py), the stack and its lifecycle
(core.py), the gateway container (gateway.py), status rows (status.py)."""

from .core import Stack
from .gateway import GatewayContainer
from .plan import Action, Plan, plan
from .spec import (
    GATEWAY_PORT,
    L_CHOSEN,
    L_COMMIT,
    L_DRAFT,
    L_FILE,
    L_HASH,
    L_IMAGE,
    L_KIND,
    L_MODEL,
    L_REPLICA,
    L_ROLE,
    L_SERVER,
    L_SHA,
    L_STACK,
    ROLE_FLAGS,
    SERVER_PORT,
    StackError,
    Unit,
    container_name,
    dns_hosts,
    dns_name,
    server_args,
    spec_hash,
)

__all__ = ["GATEWAY_PORT", "L_CHOSEN", "L_COMMIT", "L_DRAFT", "L_FILE", "L_HASH", "L_IMAGE", "L_KIND", "L_MODEL", "L_REPLICA",
           "L_ROLE", "L_SERVER", "L_SHA", "L_STACK", "ROLE_FLAGS", "SERVER_PORT", "GatewayContainer", "Plan", "Stack",
           "StackError", "Action", "Unit", "container_name", "dns_hosts", "dns_name", "plan", "server_args", "spec_hash"]
