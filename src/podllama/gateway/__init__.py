"""The gateway: one port in front of every llama-server of a stack, its management API, and the supervisor."""
