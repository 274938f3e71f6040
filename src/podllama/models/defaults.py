"""What podllama adds to a server's llama-server flags from what its model file says about itself, so that a
model answers sensibly on the first try:

- a chat server whose GGUF carries no chat template gets one: the built-in template of its architecture for
  an instruction-tuned model (llama-server would otherwise fall back to ChatML, which a Gemma or Llama model
  answers with garbage), or a plain "Question: … Answer:" template for a base model, which is what such a
  model can continue;
- an embedding server whose GGUF names no pooling type gets `--pooling mean` (llama-server refuses
  OpenAI-style embeddings without pooling).

Flags the user set in `args` always win. Every choice comes with a note that `podllama status` shows.
"""

from __future__ import annotations

from collections.abc import Mapping

from .gguf_meta import Metadata

GENERATING_ROLES = ("chat", "vision", "audio", "infill")
TEMPLATE_FLAGS = ("chat_template", "chat_template_file", "chat-template", "chat-template-file")
POOLING_FLAGS = ("pooling",)

# architecture → llama.cpp's built-in template of its instruction-tuned models
BUILTIN = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma", "qwen2": "chatml",
           "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml", "phi3": "phi3", "deepseek2": "deepseek2",
           "command-r": "command-r", "cohere2": "command-r", "granite": "granite", "exaone": "exaone3",
           "chatglm": "chatglm4", "minicpm": "minicpm", "mistral3": "mistral-v7"}
INSTRUCT_WORDS = ("instruct", "-it", " it", "chat", "sft", "dpo", "rlhf")

# A base model answers what it can continue: a question and the start of its answer.
QA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
               "{% elif m['role'] == 'user' %}Question: {{ m['content'] }}\nAnswer:"
               "{% else %} {{ m['content'] }}\n\n{% endif %}{% endfor %}")


def instruction_tuned(meta: Metadata) -> bool:
    words = " ".join(str(meta.values.get(k, "")) for k in ("general.finetune", "general.name", "general.basename"))
    return any(w in f" {words.lower()}" for w in INSTRUCT_WORDS)


def chat_template(meta: Metadata) -> tuple[str, str] | None:
    """(template, why) for a model file without a chat template; None when it has one."""
    if meta.chat_template:
        return None
    arch = meta.architecture or "?"
    if instruction_tuned(meta):
        name = BUILTIN.get(arch)
        if name is None and arch == "llama":
            name = "llama3" if meta.vocab_size >= 128000 else "llama2"
        if name is not None:
            return name, f"chat template '{name}' (the model file has none; built-in for {arch})"
        return None  # llama-server's own fallback (ChatML) is as good a guess as any
    return QA_TEMPLATE, "a question/answer chat template (a base model without one)"


def for_server(role: str, args: Mapping[str, object], meta: Metadata | None) -> tuple[list[str], list[str]]:
    """(extra llama-server flags, notes saying why) for a server of ROLE with ARGS on a model described by META."""
    if meta is None:
        return [], []
    argv: list[str] = []
    notes: list[str] = []
    keys = {k.replace("-", "_") for k in args}
    if role in GENERATING_ROLES and not keys & {f.replace("-", "_") for f in TEMPLATE_FLAGS}:
        found = chat_template(meta)
        if found is not None:
            template, why = found
            argv += ["--chat-template", template]
            notes.append(why)
    if role == "embedding" and not keys & set(POOLING_FLAGS) and meta.arch_value("pooling_type") is None:
        argv += ["--pooling", "mean"]
        notes.append("pooling 'mean' (the model file names none)")
    return argv, notes
