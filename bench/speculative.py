#!/usr/bin/env python3
"""Speculative decoding, measured side by side in one run: one podllama stack on Podman, one llama-server image,
the same target model served by several servers that differ only in how they draft:

  none          no speculative decoding
  draft: same   the target itself as its draft (every drafted token agrees: the bound on what drafting gains
                when the draft costs what the target does)
  draft: 2 of 12 layers
                a draft cut from the target: its token embeddings, output head and first 2 of its 12 layers
                (a self-speculative draft, a quarter of the target's cost)
  draft: random a one-layer model of the same tokenizer with weights of its own (drafts that rarely agree:
                what a poor draft costs)
  ngram-mod     no draft model: tokens drafted from n-grams already in the context
  synthetic     the cut draft with llama-server's benchmarking-only synthetic acceptance (--spec-synth-len: a
                mean accepted length, drafted tokens accepted at random): what speed a cheap draft buys at a
                given acceptance, which random weights cannot show (their text changes: tokens are accepted
                unverified)

The target is the tiny test model widened to 12 layers × 768 (257 MiB, f16 weights from a seeded generator):
its text is gibberish, but its arithmetic is a real model's. Each server answers the same completions
(temperature 0, 128 tokens) several times; reported: generated tokens per second (llama-server's own
`predicted_per_second`, median), its ratio to no drafting, the acceptance rate (`draft_n_accepted` /
`draft_n`), and how much of the undrafted server's text each one reproduces (in theory all of it at
temperature 0; llama-server verifies drafts in batches, whose float sums differ in the last bits, and the
near-ties of random weights turn that into other tokens). Writes bench/RESULTS-speculative.md and
bench/results-speculative.json.

Usage: bench/speculative.py [--tries 5] [--base local]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from podllama.access.credentials import Credentials  # noqa: E402
from podllama.build import images, source  # noqa: E402
from podllama.engine import get_engine  # noqa: E402
from podllama.models import tinymodel  # noqa: E402

PORT = 18941
PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog. The quick brown fox",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
SERVERS = {  # name → (label, extra services.toml lines)
    "none": ("none", ""),
    "same": ("draft: same model", 'draft_model = "target.gguf"\nspeculative = { draft_n_max = 8 }\n'),
    "cut": ("draft: 2 of 12 layers", 'draft_model = "cut.gguf"\nspeculative = { draft_n_max = 8 }\n'),
    "random": ("draft: random 1-layer", 'draft_model = "random.gguf"\nspeculative = { draft_n_max = 8 }\n'),
    "ngram": ("ngram-mod (no draft model)", 'speculative = { type = "ngram-mod" }\n'),
    "synth2": ("draft: 2 of 12 layers, synthetic mean length 2",
               'draft_model = "cut.gguf"\nspeculative = { draft_n_max = 8, synth_len = 2.0 }\n'),
    "synth4": ("draft: 2 of 12 layers, synthetic mean length 4",
               'draft_model = "cut.gguf"\nspeculative = { draft_n_max = 8, synth_len = 4.0 }\n'),
}


def podllama(*args: str, cfg: Path) -> str:
    return subprocess.run([sys.executable, "-m", "podllama.cli", *args, "-c", str(cfg)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def cut(target: Path, dest: Path, layers: int) -> None:
    """A draft made of TARGET's first LAYERS blocks, with its embeddings and output head."""
    import gguf

    r = gguf.GGUFReader(str(target))
    w = gguf.GGUFWriter(str(dest), "llama")
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = layers if field.name == "llama.block_count" else field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, value, vtype)
    for t in r.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        w.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def complete(url: str, model: str, prompt: str, headers: dict[str, str]) -> dict:
    r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=300,
                   json={"model": model, "prompt": prompt, "max_tokens": 128, "temperature": 0, "seed": 1})
    r.raise_for_status()
    return r.json()


def shared(a: str, b: str) -> int:
    """How many characters A and B have in common from their start."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tries", type=int, default=5)
    ap.add_argument("--base", default="local")
    args = ap.parse_args()
    engine = get_engine("podman")
    if not engine.image_exists(images.tag_for("cpu")):
        sys.exit(f"{images.tag_for('cpu')} is missing: podllama build --variant cpu --native")
    work = Path(tempfile.mkdtemp(prefix="podllama-bench-spec-"))
    models = work / "models"
    models.mkdir()
    models.chmod(0o755)
    vocab = source.source_dir(ROOT) / tinymodel.VOCAB_FILE
    tinymodel.write(models / "target.gguf", vocab, n_embd=768, n_layer=12, n_head=12, n_ff=2048, seed=2)
    cut(models / "target.gguf", models / "cut.gguf", 2)
    tinymodel.write(models / "random.gguf", vocab, n_embd=768, n_layer=1, n_head=12, n_ff=2048, seed=3)
    for f in models.iterdir():
        f.chmod(0o644)
    servers = "".join(f'\n[servers.{name}]\nmodel = "target.gguf"\nctx_size = 2048\nargs = {{ parallel = 1 }}\n'
                      f"{extra}" for name, (_, extra) in SERVERS.items())
    cfg = work / "services.toml"
    cfg.write_text(f'[stack]\nname = "plbenchspec"\nengine = "podman"\nvariant = "cpu"\nmodels_dir = "{models}"\n'
                   f'[build]\nbase = "{args.base}"\ncpu_target = "native"\nui = "off"\n[gateway]\nport = {PORT}\n'
                   f"{servers}")
    rows = []
    try:
        podllama("start", cfg=cfg)
        headers = {"Authorization": f"Bearer {Credentials(work / '.podllama').admin_key()}"}
        url = f"http://127.0.0.1:{PORT}"
        texts: dict[str, list[str]] = {}
        for name, (label, _) in SERVERS.items():
            complete(url, name, "warm up", headers)
            speeds, drafted, accepted = [], 0, 0
            for _ in range(args.tries):  # one server at a time: each has the cores to itself
                for prompt in PROMPTS:
                    out = complete(url, name, prompt, headers)
                    speeds.append(out["timings"]["predicted_per_second"])
                    drafted += out["timings"].get("draft_n", 0)
                    accepted += out["timings"].get("draft_n_accepted", 0)
                    texts.setdefault(name, []).append(out["choices"][0]["text"])
            rows.append({"server": name, "drafting": label, "tokens_per_s": round(statistics.median(speeds), 1),
                         "drafted": drafted, "accepted": accepted,
                         "acceptance": round(accepted / drafted, 3) if drafted else None,
                         "identical": sum(a == b for a, b in zip(texts[name], texts["none"], strict=True)),
                         "completions": len(texts[name]),
                         "shared_prefix": round(statistics.median(
                             shared(a, b) / max(1, len(b)) for a, b in zip(texts[name], texts["none"], strict=True)), 2)})
            print(rows[-1], flush=True)
    finally:
        podllama("down", cfg=cfg)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio"] = round(r["tokens_per_s"] / base, 2)
    (ROOT / "bench" / "results-speculative.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Speculative decoding", "",
        f"`bench/speculative.py`, {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {len(PROMPTS)} prompts × "
        f"{args.tries} tries, 128 tokens each at temperature 0, one server at a time. Target: the tiny test model "
        "at 12 layers × 768 (257 MiB f16), on the CPU image.", "",
        "| drafting | tokens/s (median) | vs none | acceptance | drafted | accepted | text as none's: identical | "
        "median shared start |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['drafting']} | {r['tokens_per_s']} | {r['ratio']}× | {percent(r['acceptance'])} | {r['drafted']} "
          f"| {r['accepted']} | {r['identical']} of {r['completions']} | {percent(r['shared_prefix'])} |" for r in rows),
        "", "Raw numbers: bench/results-speculative.json.", ""]
    (ROOT / "bench" / "RESULTS-speculative.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
