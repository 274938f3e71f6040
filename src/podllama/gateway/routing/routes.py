"""Every route llama-server registers (llama.cpp 0c1e570, single-model mode), as data.

Routing, /help, the OpenAPI document and the tests all read this one table. Each entry says which methods and
paths (aliases included) it has, the capability it needs (which decides the server roles that can answer),
whether it can stream, whether it is about the model or about one server process, and the llama-server flag
that turns it on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Which server roles provide a capability, best first. "generate" is text generation from a loaded LLM.
CAPABILITY_ROLES: dict[str, tuple[str, ...]] = {
    "generate": ("chat", "vision", "audio", "infill"),
    "infill": ("infill", "chat"),
    "embedding": ("embedding",),
    "rerank": ("rerank",),
    "transcription": ("transcription", "audio"),
    "image": ("image",),
    "speech": ("speech",),
    "server": ("chat", "vision", "audio", "infill", "embedding", "rerank"),
}


@dataclass(frozen=True)
class Endpoint:
    name: str
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    capability: str  # a key of CAPABILITY_ROLES
    purpose: str
    # model: routed by the request's model; server: one server process (?server=/?model=, else the chat default);
    # gateway: answered by the gateway itself for the whole stack
    scope: str = "model"
    streams: bool = False
    flag: str | None = None  # the llama-server flag it needs, when not always on
    params: tuple[str, ...] = ()
    body_model: bool = True  # the JSON (or multipart) body may carry "model"
    prefix: bool = False  # paths are prefixes (/slots/{id})
    multimodal: bool = False  # image/audio parts can send it to a vision/audio server
    image_limits: bool = False  # an image request: [gateway] max_images and max_image_side hold (body.image_problem)
    # the shape of its answer, which says where its token counts are (tally.READERS): openai, anthropic,
    # responses, native, embedding, rerank, count, image, speech, transcription, none
    answer: str = "none"
    access: str = "inference"  # who may call it: public, inference (a key, where any is set) or admin
    # its requests can be kept for the update's conformance check and replayed on a new build ([update] sample)
    replay: bool = False

    @property
    def roles(self) -> tuple[str, ...]:
        return CAPABILITY_ROLES[self.capability]


E = Endpoint
ENDPOINTS: tuple[Endpoint, ...] = (
    # -- generation ------------------------------------------------------------------------------------------
    E("chat.completions", ("POST",), ("/v1/chat/completions", "/chat/completions"), "generate",
      "OpenAI Chat Completions: messages, tools, response_format, reasoning; image/audio parts go to a vision/audio "
      "server", streams=True, multimodal=True, answer="openai",
      params=("model", "messages", "stream", "max_tokens", "temperature", "tools", "response_format"), replay=True),
    E("chat.control", ("POST",), ("/v1/chat/completions/control",), "generate",
      "Act on an in-flight chat completion started with reasoning_control: {id, action: \"reasoning_end\"}",
      params=("model", "id", "action")),
    E("chat.input_tokens", ("POST",), ("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"),
      "generate", "Token count of a chat request, without generating", multimodal=True, answer="count",
      params=("model", "messages")),
    E("completions.oai", ("POST",), ("/v1/completions",), "generate", "OpenAI legacy Completions", streams=True, answer="openai",
      params=("model", "prompt", "stream", "max_tokens", "temperature"), replay=True),
    E("completions.native", ("POST",), ("/completion", "/completions"), "generate",
      "llama.cpp-native completion (prompt as text, tokens or multimodal), every native sampling option",
      streams=True, answer="native", params=("prompt", "n_predict", "stream", "temperature", "grammar"), replay=True),
    E("responses", ("POST",), ("/v1/responses", "/responses"), "generate", "OpenAI Responses API",
      streams=True, multimodal=True, answer="responses", params=("model", "input", "instructions", "stream")),
    E("responses.input_tokens", ("POST",), ("/v1/responses/input_tokens", "/responses/input_tokens"), "generate",
      "Token count of a Responses request", answer="count", params=("model", "input")),
    E("messages", ("POST",), ("/v1/messages",), "generate", "Anthropic Messages API", streams=True,
      multimodal=True, answer="anthropic", params=("model", "messages", "max_tokens", "stream", "system")),
    E("messages.count_tokens", ("POST",), ("/v1/messages/count_tokens",), "generate",
      "Anthropic token counting: {input_tokens}", answer="count", params=("model", "messages")),
    E("infill", ("POST",), ("/infill",), "infill",
      "Code fill-in-the-middle: input_prefix, input_suffix, input_extra (needs a model with FIM tokens)",
      streams=True, answer="native", params=("input_prefix", "input_suffix", "input_extra", "prompt", "n_predict"), replay=True),
    E("audio.transcriptions", ("POST",), ("/v1/audio/transcriptions", "/audio/transcriptions"), "transcription",
      "OpenAI speech to text (multipart: file, model, prompt, language, response_format json|text|verbose_json|"
      "srt|vtt, temperature): whisper-server, or a llama-server with an audio projector (json only)",
      streams=True, answer="transcription",
      params=("file", "model", "prompt", "language", "response_format", "temperature")),
    # -- speech and images (the speech server, sd-server) ----------------------------------------------------
    E("audio.speech", ("POST",), ("/v1/audio/speech", "/audio/speech"), "speech",
      "OpenAI text to speech: {model, input, voice, response_format: wav|pcm, speed} → audio", streams=True,
      answer="speech",
      params=("model", "input", "voice", "response_format", "speed")),
    E("audio.voices", ("GET",), ("/v1/audio/voices", "/audio/voices"), "speech",
      "The voices of a speech model (?model=, else the default speech server)", body_model=False,
      params=("model",)),
    E("audio.models", ("GET",), ("/v1/audio/models", "/audio/models"), "speech",
      "The models of a speech server (?model=, else the default one)", body_model=False, params=("model",)),
    E("images.generations", ("POST",), ("/v1/images/generations", "/images/generations"), "image",
      "OpenAI image generation: {model, prompt, n, size: WxH, response_format: b64_json} (sd-server)",
      params=("model", "prompt", "n", "size", "response_format"), image_limits=True, answer="image"),
    E("images.edits", ("POST",), ("/v1/images/edits", "/images/edits"), "image",
      "OpenAI image edits (multipart: image, mask, prompt, model, n, size)",
      params=("image", "mask", "prompt", "model", "n", "size"), image_limits=True, answer="image"),
    E("sdapi", ("POST",), ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"), "image",
      "AUTOMATIC1111-style txt2img and img2img (sd-server's own API; the default image server)", body_model=False,
      params=("prompt", "negative_prompt", "width", "height", "steps", "seed"), image_limits=True, answer="image"),
    # -- embeddings and rerank -------------------------------------------------------------------------------
    E("embeddings.oai", ("POST",), ("/v1/embeddings",), "embedding", "OpenAI embeddings", flag="--embedding", answer="embedding",
      params=("model", "input", "encoding_format"), replay=True),
    E("embeddings.native", ("POST",), ("/embedding", "/embeddings"), "embedding",
      "llama.cpp-native embeddings (per-token vectors with --pooling none)", flag="--embedding",
      answer="embedding",
      params=("content", "input"), replay=True),
    E("rerank", ("POST",), ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking"), "rerank",
      "Rerank documents against a query (Jina or TEI format)", flag="--rerank", answer="rerank",
      params=("model", "query", "documents", "top_n", "texts"), replay=True),
    # -- tokens and templates --------------------------------------------------------------------------------
    E("tokenize", ("POST",), ("/tokenize",), "generate", "Text → tokens", params=("content", "add_special", "with_pieces")),
    E("detokenize", ("POST",), ("/detokenize",), "generate", "Tokens → text", params=("tokens",)),
    E("apply_template", ("POST",), ("/apply-template",), "generate",
      "Apply the chat template to messages, without generating", params=("messages",)),
    # -- one server process ----------------------------------------------------------------------------------
    E("props", ("GET", "POST"), ("/props",), "server", "Server and model properties (POST needs --props)",
      scope="server", params=("server", "model")),
    E("slots", ("GET",), ("/slots",), "server", "Per-slot state (?fail_on_no_slot=1 → 503 when none is idle)",
      scope="server", params=("server", "model", "fail_on_no_slot")),
    E("slots.action", ("POST",), ("/slots/",), "server",
      "Save, restore or erase a slot: /slots/{id}?action=save|restore|erase (needs --slot-save-path)",
      scope="server", prefix=True, params=("server", "action", "filename")),
    E("metrics", ("GET",), ("/metrics",), "server",
      "Prometheus metrics: the gateway's own; with ?server=NAME (or ?model=) that llama-server's (needs --metrics, "
      "which podllama turns on)", scope="server", params=("server", "model")),
    E("lora_adapters", ("GET", "POST"), ("/lora-adapters",), "server",
      "List LoRA adapters, or set their scales (POST body: [{id, scale}])", scope="server", body_model=False,
      params=("server", "model")),
    E("tools", ("GET", "POST"), ("/tools",), "server", "Built-in and MCP tools (experimental; needs --tools)",
      scope="server", flag="--tools", params=("server",)),
    E("cors_proxy", ("GET", "POST"), ("/cors-proxy",), "server",
      "The web UI's proxy to remote MCP servers (experimental; needs --ui-mcp-proxy)", scope="server",
      flag="--ui-mcp-proxy", params=("server", "url")),
    E("health", ("GET",), ("/health", "/v1/health"), "server",
      "Liveness: the gateway answers itself (public, no key); a server's own via /servers/NAME/health",
      scope="gateway", body_model=False, access="public"),
    E("models", ("GET",), ("/v1/models", "/models"), "server",
      "Every model of every server, in the OpenAI list shape (id, owned_by, role, capabilities, status)",
      scope="gateway", body_model=False),
    # -- resumable streams (X-Conversation-Id) ---------------------------------------------------------------
    E("stream.follow", ("GET", "DELETE"), ("/v1/stream",), "generate",
      "Replay and follow (GET) or stop (DELETE) a generation started with X-Conversation-Id",
      scope="server", streams=True, params=("conv_id", "from")),
    E("stream.lookup", ("POST",), ("/v1/streams/lookup",), "generate",
      "Status of known conversation ids: {conversation_ids: [...]}", scope="server", body_model=False,
      params=("conversation_ids",)),
)

PASSTHROUGH = "/servers/"  # /servers/{name}/{path}: anything, to one server (also routes added upstream later)

# the endpoints whose requests [update] sample keeps, and the path each is replayed on
REPLAYED: dict[str, str] = {e.name: e.paths[0] for e in ENDPOINTS if e.replay}

@dataclass
class RouteTable:
    exact: dict[tuple[str, str], Endpoint] = field(default_factory=dict)
    prefixes: list[tuple[str, str, Endpoint]] = field(default_factory=list)

    @classmethod
    def build(cls, endpoints: tuple[Endpoint, ...] = ENDPOINTS) -> RouteTable:
        table = cls()
        for ep in endpoints:
            for method in ep.methods:
                for path in ep.paths:
                    if ep.prefix:
                        table.prefixes.append((method, path, ep))
                    else:
                        table.exact[(method, path)] = ep
        return table

    def match(self, method: str, path: str) -> Endpoint | None:
        ep = self.exact.get((method, path))
        if ep is not None:
            return ep
        for m, prefix, ep in self.prefixes:
            if m == method and path.startswith(prefix) and len(path) > len(prefix):
                return ep
        return None

    def paths(self) -> set[str]:
        return {p for (_, p) in self.exact} | {p for (_, p, _) in self.prefixes}
