"""The command's habits, run as a person runs it (the real `podllama`, in a subprocess): version, config before
or after the subcommand, exit codes, JSON errors, completion, the root sentence, `run` through a gateway, and
Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests import scripted
from tests.helpers import PODLLAMA, ROOT, podllama, wait_until


def test_version():
    proc = podllama("--version")
    assert proc.stdout.startswith("podllama ") and "llama.cpp " in proc.stdout
    assert json.loads(podllama("version", "--json").stdout)["podllama"]


def test_the_config_goes_before_or_after_the_subcommand(tmp_path):
    cfg = tmp_path / "services.toml"
    cfg.write_text('[servers.chat]\nmodel = "x.gguf"\nrole = "juggler"\n')
    before = podllama("-c", str(cfg), "check", "--no-flags", check=False)
    after = podllama("check", "--no-flags", "-c", str(cfg), check=False)
    assert before.returncode == after.returncode == 1
    assert "servers.chat.role" in before.stderr and before.stderr == after.stderr
    cfg.write_text('[servers.chat]\nmodel = "x.gguf"\n')
    assert "ok (1 servers)" in podllama("-c", str(cfg), "check", "--no-flags").stdout


def test_exit_codes_and_json_errors(tmp_path):
    usage = podllama("stat", check=False)
    assert usage.returncode == 2 and "No such command 'stat'" in usage.stderr
    as_json = podllama("stat", "--json", check=False)
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["error"]["type"] == "usage"
    missing = podllama("models", "list", "-c", str(tmp_path / "nope.toml"), "--json", check=False)
    error = json.loads(missing.stdout)["error"]
    assert missing.returncode == 1 and error["type"] == "ConfigError" and "nope.toml" in error["message"]
    assert "Traceback" not in missing.stderr


def test_errors_keep_their_brackets(tmp_path):
    """A message names the config section that fixes it ("[build] …"): printed as written, not taken for markup."""
    cfg = tmp_path / "services.toml"
    cfg.write_text('[build]\ncuda_architectures = ["61"]\n')
    proc = podllama("build", "--variant", "cuda", "--base", "local", "-c", str(cfg), check=False, timeout=120)
    assert proc.returncode == 1 and "cannot build for compute capability 61" in proc.stderr
    assert "[build] cuda_architectures chooses" in proc.stderr and "[local])" in proc.stderr


def test_shell_completion_is_there():
    script = podllama("--show-completion", "bash", env={"SHELL": "/bin/bash"}).stdout
    assert "_podllama_completion" in script and "complete" in script


def test_a_normal_user_gets_one_sentence():
    """Not root: the commands that drive the engine say so, with the fix (the user id is the OS's answer)."""
    code = ("import os, sys; os.geteuid = lambda: 1000; sys.argv = ['podllama', 'status'];"
            "from podllama.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "runs its stacks as root" in proc.stderr and "sudo podllama status" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_streams_an_answer_through_the_gateway(gateway, upstream):
    upstream.on("/v1/chat/completions", scripted.sse(5, 0.01))
    gw = gateway()
    proc = podllama("run", "Hello?", "-c", str(gw.cfg_path))
    assert proc.stdout.strip() == "tok" * 5
    sent = json.loads(upstream.received("/v1/chat/completions")[-1].body)
    assert sent["messages"] == [{"role": "user", "content": "Hello?"}] and sent["stream"] is True
    as_json = json.loads(podllama("run", "chat", "Hi", "--json", "-c", str(gw.cfg_path)).stdout)
    assert as_json == {"model": "chat", "content": "tok" * 5}


def test_ctrl_c_exits_130(gateway, upstream):
    upstream.on("/v1/chat/completions", scripted.sse(200, 0.05))
    gw = gateway()
    proc = subprocess.Popen([*PODLLAMA, "run", "Tell me everything", "-c", str(gw.cfg_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    first = wait_until(lambda: proc.stdout.read(3), timeout=30, interval=0.05)  # the answer has begun
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert (first + out).startswith("tok")  # what had come is kept


def test_an_unknown_export_format_is_refused_before_anything_is_built(tmp_path):
    proc = podllama("export", "helm", "-c", str(tmp_path / "absent.toml"), "-o", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "no export format 'helm'" in proc.stderr and "quadlet" in proc.stderr
    assert "gateway image" not in proc.stderr + proc.stdout and not (tmp_path / "x").exists()
