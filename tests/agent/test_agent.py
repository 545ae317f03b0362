"""The student as an agent: turn parsing, SAG's choice, the LLM teacher against a local
HTTP server replaying recorded responses, and `sad-jax eval` end to end on every adapter
with an untrained checkpoint."""

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import jax
import pytest

from sad_jax.agent import evaluate, llm, react
from sad_jax.agent.envs.registry import make_env
from sad_jax.agent.tools import ToolResult
from sad_jax.data import schema
from sad_jax.models import checkpoint_io
from sad_jax.models import transformer as T
from sad_jax.models.config import ModelConfig
from tests.train.conftest import REPO


def test_parse_turn():
  assert react.parse_turn("Thought: go on\nAction: take coin\nmore") == ("go on", "take coin")
  assert react.parse_turn(" I see it.\nAction: open fridge\nObservation: x") == (
      "I see it.", "open fridge")
  assert react.parse_turn("Thought: hmm\nAction: python[x = 1\nprint(x)]\n") == (
      "hmm", "python[x = 1\nprint(x)]")
  assert react.parse_turn("Thought: no action here") == ("no action here", None)
  assert react.parse_turn("Action:   \n") == ("", None)


def test_sag_majority_parse_and_code_filters():
  t = lambda a: react.Turn("t", a, f"Action: {a}", 3)
  chosen, info = react.choose([t(None), t("move east"), t("Move  East"), t("take coin")])
  assert chosen.action == "move east" and info == {"valid": 3, "votes": 2}
  chosen, info = react.choose([t(None), t(None)])
  assert chosen.action is None and info["valid"] == 0      # falls back to the first
  runs = {"print(1+1)": ToolResult(True, "2\n"), "print(2)": ToolResult(True, "2"),
          "1/0": ToolResult(False, "ZeroDivisionError", "exception"),
          "print(3)": ToolResult(True, "3")}
  cands = [t("python[1/0]"), t("python[print(3)]"), t("python[print(1+1)]"),
           t("python[print(2)]")]
  chosen, info = react.choose(cands, code_runner=runs.__getitem__)
  # the failing code is dropped; outputs "2" win 2–1 (different code, same outcome)
  assert chosen.action == "python[print(1+1)]" and info == {"valid": 3, "votes": 2}


def test_wilson_interval_hand_computed():
  lo, hi = evaluate.wilson(5, 10)
  assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
  assert evaluate.wilson(0, 20)[0] == 0.0 and evaluate.wilson(0, 20)[1] == pytest.approx(
      0.1611, abs=1e-4)


# ----------------------------------------------------------------------------- LLM teacher


class Replay(BaseHTTPRequestHandler):
  """Serves recorded chat-completion responses in order; records the requests."""

  responses: ClassVar[list] = []
  requests: ClassVar[list] = []
  fail_first: ClassVar[int] = 0

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    type(self).requests.append({"path": self.path, **body})
    if type(self).fail_first > 0:
      type(self).fail_first -= 1
      self.send_response(503)
      self.end_headers()
      self.wfile.write(b"busy")
      return
    content = type(self).responses.pop(0)
    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.end_headers()
    self.wfile.write(payload.encode())

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  httpd = HTTPServer(("127.0.0.1", 0), Replay)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
  httpd.shutdown()


def test_llm_teacher_first_thought_prefix_and_filtering(server, tmp_path):
  from sad_jax.agent.envs.registry import make_env

  env = make_env("math:basic_arithmetic")
  tasks = env.tasks("train")[:2]
  answers = []
  for task in tasks:
    env.reset(task=task)
    answers.append(env.oracle_actions()[-1])
  env.close()
  Replay.requests = []
  Replay.fail_first = 1   # one 503 first: the client retries
  Replay.responses = [
      # episode 1: CoT, then a python call, then the right answer
      "First, evaluate the expression left to right. Then report it.",
      "Thought: I will compute it.\nAction: python[print(1)]",
      f"Thought: Done.\nAction: {answers[0]}",
      # episode 2: CoT, then a wrong answer (dropped: failed)
      "Let me think. It is big.",
      "Thought: Guess.\nAction: finish[999999]",
  ]
  client = llm.Client(server, model="replay-teacher", retries=2)
  client_sleep = llm.time.sleep
  llm.time.sleep = lambda s: None
  try:
    trajs = list(llm.generate(client, "math:basic_arithmetic", split="train", episodes=2))
  finally:
    llm.time.sleep = client_sleep
  assert len(trajs) == 1 and trajs[0].success      # the failed episode is filtered out
  first = next(s.text for s in trajs[0].segments if s.kind == "reason")
  assert first.startswith("First, evaluate the expression left to right.")
  assert trajs[0].meta["first_thought"] == "First, evaluate the expression left to right."
  bodies = [r for r in Replay.requests if r["messages"][0]["role"] == "system"]
  assert "Begin your thought with: First, evaluate" in bodies[0]["messages"][1]["content"]
  assert all(r["path"] == "/v1/chat/completions" and r["model"] == "replay-teacher"
             for r in Replay.requests)
  assert len(Replay.requests) == 6                 # 5 answers + the retried 503


def test_llm_client_errors_name_the_endpoint():
  from sad_jax.common.errors import DataError

  client = llm.Client("http://127.0.0.1:9/v1", model="x", retries=0, timeout=2)
  with pytest.raises(DataError, match="cannot reach") as e:
    client.chat([{"role": "user", "content": "hi"}])
  assert "127.0.0.1:9/v1/chat/completions" in str(e.value)


# ----------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, spm_path):
  folder = str(tmp_path_factory.mktemp("untrained"))
  cfg = ModelConfig(model_type="llama", vocab_size=600, hidden_size=32, intermediate_size=64,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    max_position_embeddings=8192)
  checkpoint_io.save_params(folder, cfg, T.init_params(cfg, jax.random.PRNGKey(0)))
  shutil.copyfile(spm_path, os.path.join(folder, "tokenizer.model"))
  return folder


@pytest.mark.parametrize("spec,sag", [("twx:coin", 0), ("math:basic_arithmetic", 2)])
def test_eval_runs_end_to_end(untrained, tmp_path, spec, sag):
  policy = evaluate.load_policy(untrained, max_new_tokens=16, max_prompt_tokens=512)
  out = str(tmp_path / "tr.jsonl")
  r = evaluate.evaluate(policy, env_spec=spec, episodes=3, max_steps=2, batch=2, sag=sag,
                        transcripts=out, progress=False)
  assert r.episodes == 3 and 0 <= r.success_rate <= 1 and r.ci95[0] <= r.success_rate
  assert r.mean_steps <= 2 and r.tokens_per_s > 0 and 0 <= r.invalid_action_rate <= 1
  trajs = schema.read_jsonl(out)
  assert [t.meta["task"] for t in trajs] == sorted(t.meta["task"] for t in trajs)
  assert all(t.success is not None and t.segments[0].kind == "task" for t in trajs)
  # the caller's environments, reused (left open): the same transcripts, twice
  envs = [make_env(spec) for _ in range(2)]
  try:
    for _ in range(2):
      again = str(tmp_path / "again.jsonl")
      evaluate.evaluate(policy, env_spec=spec, episodes=3, max_steps=2, batch=2, sag=sag,
                        transcripts=again, progress=False, envs=envs)
      assert open(again).read() == open(out).read()
  finally:
    for env in envs:
      env.close()


def test_eval_cli_on_textworld_with_inspectable_transcripts(untrained, tmp_path,
                                                            tmp_path_factory):
  games = str(tmp_path_factory.mktemp("tw_eval"))
  out = tmp_path / "tr.jsonl"
  # the eval builds its test game with tw-make on first use, into this folder
  env_vars = {**os.environ, "SAD_JAX_TEXTWORLD_GAMES": games}
  p = subprocess.run([sys.executable, "-m", "sad_jax.cli", "eval", "--checkpoint", untrained,
                      "--env", "textworld:coin?level=1", "--episodes", "1", "--max-steps", "2",
                      "--max-new-tokens", "12", "--transcripts", str(out), "--json",
                      str(tmp_path / "r.json"), "--quiet"], cwd=REPO, env=env_vars,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "success" in p.stdout and "95% CI" in p.stdout
  result = json.loads((tmp_path / "r.json").read_text())
  assert result["episodes"] == 1 and result["env"] == "textworld:coin?level=1"
  p = subprocess.run([sys.executable, "-m", "sad_jax.cli", "inspect", str(out), "--color",
                      "never"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0 and "[task]" in p.stdout and "[reason]" in p.stdout
