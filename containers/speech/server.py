"""podllama's speech server: OpenAI-shaped text to speech around a piper voice.

It runs only inside its own image (piper is GPL-3.0 and stays there). Standard library only, besides piper:

  POST /v1/audio/speech   {model, input, voice, response_format: wav|pcm, speed}  -> audio/wav or raw 16-bit PCM
  GET  /v1/audio/voices   the voices (speakers) of the loaded voice model
  GET  /v1/audio/models   /v1/models   the model, as OpenAI lists them
  GET  /health            200 once the voice is loaded, 503 while it loads (as llama-server)

With PODLLAMA_API_KEY_FILE set, every route but /health needs "Authorization: Bearer KEY".
"""

from __future__ import annotations

import argparse
import hmac
import io
import json
import os
import sys
import threading
import time
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_BODY = 64 * 1024  # a request's JSON
MAX_INPUT = 4096  # characters of text, as OpenAI's /v1/audio/speech
FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}


class Voice:
    """The piper voice, loaded in the background; synthesis one request at a time (it uses every thread)."""

    def __init__(self, model: Path, threads: int) -> None:
        self.model, self.threads = model, threads
        self.voice: Any = None
        self.error: str | None = None
        self.lock = threading.Lock()

    def load(self) -> None:
        try:
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig

            options = onnxruntime.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            config = PiperConfig.from_dict(json.loads(Path(f"{self.model}.json").read_text()))
            voice = PiperVoice(config=config, session=onnxruntime.InferenceSession(
                str(self.model), sess_options=options, providers=["CPUExecutionProvider"]))
            self.voice = voice
            print(f"voice loaded: {self.model} ({voice.config.sample_rate} Hz)", flush=True)
        except Exception as e:  # reported by /health and the log; the process stays up to say so
            self.error = f"{type(e).__name__}: {e}"
            print(f"error: cannot load the voice {self.model}: {self.error}", file=sys.stderr, flush=True)
            os._exit(1)

    @property
    def speakers(self) -> list[str]:
        return sorted(self.voice.config.speaker_id_map) if self.voice else []

    def synthesize(self, text: str, speaker: str | None, speed: float) -> tuple[int, list[bytes]]:
        from piper import SynthesisConfig

        config = SynthesisConfig(speaker_id=self.voice.config.speaker_id_map.get(speaker or ""),
                                 length_scale=1.0 / speed)
        with self.lock:
            chunks = list(self.voice.synthesize(text, syn_config=config))
        rate = chunks[0].sample_rate if chunks else self.voice.config.sample_rate
        return rate, [c.audio_int16_bytes for c in chunks]


class Handler(BaseHTTPRequestHandler):
    server_version = "podllama-speech"
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may stay silent (a slow or idle client does not hold a thread forever)
    voice: Voice
    alias: str
    key: str | None

    def log_message(self, fmt: str, *args: Any) -> None:
        sys.stdout.write(f"{self.address_string()} {fmt % args}\n")

    # -- answers --------------------------------------------------------------------------------------------
    def send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:  # a refused request's body may be unread: never parse it as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def json(self, status: int, data: Any) -> None:
        self.send(status, json.dumps(data).encode(), "application/json")

    def error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self.json(status, {"error": {"code": status, "message": message, "type": kind}})

    def allowed(self) -> bool:
        if self.key is None:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
            return True
        self.error(401, "Invalid API Key", "authentication_error")
        return False

    # -- routes ---------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if self.voice.voice is None:
                self.json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
            else:
                self.json(200, {"status": "ok"})
            return
        if not self.allowed():
            return
        created = int(Path(self.voice.model).stat().st_mtime)
        if path in ("/v1/models", "/v1/audio/models"):
            self.json(200, {"object": "list", "data": [{"id": self.alias, "object": "model", "created": created,
                                                        "owned_by": "podllama"}],
                            "models": [{"id": self.alias, "name": self.alias}]})
        elif path == "/v1/audio/voices":
            names = self.voice.speakers or [self.alias]
            self.json(200, {"voices": [{"id": n, "name": n} for n in names]})
        else:
            self.error(404, f"no route GET {path}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if not self.allowed():
            return
        if path != "/v1/audio/speech":
            self.error(404, f"no route POST {path}")
            return
        if self.voice.voice is None:
            self.error(503, "Loading model", "unavailable_error")
            return
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            self.error(413 if length > MAX_BODY else 411, f"the JSON body must have a Content-Length of 1 to "
                                                          f"{MAX_BODY} bytes")
            return
        try:
            req = json.loads(self.rfile.read(length))
            if not isinstance(req, dict):
                raise ValueError("the body must be a JSON object")
            text = req.get("input")
            if not isinstance(text, str) or not text.strip():
                raise ValueError("'input' must be the text to speak")
            if len(text) > MAX_INPUT:
                raise ValueError(f"'input' is {len(text)} characters; at most {MAX_INPUT}")
            fmt = req.get("response_format") or "wav"
            if fmt not in FORMATS:
                raise ValueError(f"response_format '{fmt}' is not served here; use one of {', '.join(FORMATS)}")
            speed = req.get("speed", 1.0)
            if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.25 <= speed <= 4.0:
                raise ValueError("'speed' must be a number from 0.25 to 4.0")
            voice = req.get("voice")
            if voice is not None and not isinstance(voice, str):
                raise ValueError("'voice' must be a string")
        except ValueError as e:  # json.JSONDecodeError is one
            self.error(400, str(e))
            return
        started = time.monotonic()
        rate, chunks = self.voice.synthesize(text, voice, float(speed))
        pcm = b"".join(chunks)
        if fmt == "wav":
            out = io.BytesIO()
            with wave.open(out, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes(pcm)
            body = out.getvalue()
        else:
            body = pcm
        self.send_response(200)
        self.send_header("Content-Type", FORMATS[fmt])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Sample-Rate", str(rate))
        self.send_header("X-Synthesis-Seconds", f"{time.monotonic() - started:.3f}")
        self.end_headers()
        self.wfile.write(body)


def self_test() -> int:
    """What the image's smoke test runs without a voice: piper, its espeak-ng data and onnxruntime load, and
    English text turns into phonemes."""
    import onnxruntime
    from piper.phonemize_espeak import EspeakPhonemizer

    phonemes = EspeakPhonemizer().phonemize("en-us", "Hello world.")
    ok = bool(phonemes and phonemes[0])
    print(json.dumps({"ok": ok, "onnxruntime": onnxruntime.__version__, "phonemes": ["".join(p) for p in phonemes]}))
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description="OpenAI-shaped text to speech with a piper voice")
    p.add_argument("-m", "--model", help="the voice: a piper .onnx file (its .onnx.json beside it)")
    p.add_argument("--alias", help="the model name it answers to (default: the file's name)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-t", "--threads", type=int, default=0, help="threads for synthesis (default: all)")
    p.add_argument("--self-test", action="store_true", help="check the image's parts and exit")
    args = p.parse_args()
    if args.self_test:
        return self_test()
    if not args.model:
        p.error("--model is required")
    model = Path(args.model)
    if not model.is_file() or not Path(f"{model}.json").is_file():
        print(f"error: the voice needs {model} and {model}.json", file=sys.stderr)
        return 1
    key = None
    if os.environ.get("PODLLAMA_API_KEY_FILE"):
        key = Path(os.environ["PODLLAMA_API_KEY_FILE"]).read_text().strip()
        if not key:
            print("error: the API key file is empty", file=sys.stderr)
            return 1
    voice = Voice(model, args.threads)
    handler = type("Bound", (Handler,), {"voice": voice, "alias": args.alias or model.stem, "key": key})
    httpd = ThreadingHTTPServer((args.host, args.port), handler)
    httpd.daemon_threads = True
    threading.Thread(target=voice.load, daemon=True).start()
    print(f"listening on {args.host}:{args.port}", flush=True)
    httpd.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
