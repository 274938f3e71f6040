import pytest

from podllama.build.flags import FlagError, FlagSet, render

HELP = """----- common params -----

-h,    --help, --usage                  print usage and exit
--version                               show version and build info
-t,    --threads N                      number of CPU threads to use during generation (default: -1)
                                        (env: LLAMA_ARG_THREADS)
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default: 'auto')
--mmap, --no-mmap                       whether to memory-map model (default: enabled)
--pooling {none,mean,cls,last,rank}     pooling type for embeddings, use model default if unspecified
-np,   --parallel N                     number of server slots (default: -1, -1 = auto)
--jinja, --no-jinja                     whether to use jinja template engine for chat (default: enabled)
-m,    --model FNAME                    model path to load
--override-tensor-draft, -otd <tensor name pattern>=<buffer type>,...
                                        override tensor buffer type for draft model
--metrics                               enable prometheus compatible metrics endpoint (default: disabled)
"""


def test_parse_help():
    fs = FlagSet.parse(HELP)
    for name in ("--threads", "-t", "--ctx-size", "-fa", "--flash-attn", "--no-mmap", "--pooling", "-np",
                 "--metrics", "--override-tensor-draft", "-otd", "--version", "--usage"):
        assert name in fs, name
    assert fs.flags["--parallel"].takes_value and not fs.flags["--metrics"].takes_value
    assert fs.flags["--mmap"].negatives == ["--no-mmap"] and not fs.flags["--mmap"].takes_value
    assert "common" not in " ".join(fs.names())


def test_render_against_known_flags():
    fs = FlagSet.parse(HELP)
    assert render({"parallel": 2, "flash_attn": "on", "metrics": True, "mmap": False, "np": 3}, fs) == [
        "--parallel", "2", "--flash-attn", "on", "--metrics", "--no-mmap", "-np", "3"]
    assert render({"pooling": ["mean"]}, fs) == ["--pooling", "mean"]


@pytest.mark.parametrize("args,message", [
    ({"paralel": 2}, "has no flag --paralel"),
    ({"model": "x.gguf"}, "use model in the server section"),
    ({"ctx_size": 10}, "use ctx_size"),
    ({"embedding": True}, 'role = "embedding"'),
    ({"metrics": 1}, "is a switch"),
    ({"parallel": True}, "takes a value"),
    ({"metrics": False}, "no negative form"),
])
def test_render_rejects(args, message):
    with pytest.raises(FlagError, match=message.replace("(", r"\(")):
        render(args, FlagSet.parse(HELP))


def test_render_without_known_flags_is_structural():
    assert render({"parallel": 2, "cont_batching": False, "t": 4}) == ["--parallel", "2", "--no-cont-batching", "-t", "4"]
