"""One gateway process for the benchmark: the real gateway app, served as the container serves it, with the
upstream client chosen on the command line (`own`: podllama's; `aiohttp`: aiohttp's behind the same
interface) and, optionally, one fixed upstream address instead of the engine's containers.

    python bench/gatewayproc.py --config services.toml --port 18911 --client aiohttp [--upstream 127.0.0.1:19000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]

from aiohttp_client import AiohttpClient  # noqa: E402

from podllama import config  # noqa: E402
from podllama.gateway.app import Gateway  # noqa: E402
from podllama.gateway.front.server import serve  # noqa: E402
from podllama.gateway.routing.upstreams import Target  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--client", choices=("own", "aiohttp"), default="own")
    p.add_argument("--upstream", help="HOST:PORT every server of the config is taken to be at")
    args = p.parse_args()
    cfg = config.load(args.config)
    discover = None
    if args.upstream:
        host, _, port = args.upstream.partition(":")
        discover = lambda: [Target(n, f"fixed-{n}", host, int(port)) for n in cfg.servers]  # noqa: E731
    gw = Gateway(cfg, supervise=False, discover=discover, bound="127.0.0.1")
    if args.client == "aiohttp":
        gw.proxy.client = AiohttpClient()  # type: ignore[assignment]
        gw.proxy.configure(cfg.gateway, gw.credentials.server_key())
    serve(gw, "127.0.0.1", args.port, gw.limits)


if __name__ == "__main__":
    main()
