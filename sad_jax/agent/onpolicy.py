"""`sad-jax opd`: on-policy distillation in rounds. Each round the current student plays
N train-fold episodes (agent/rollout.py), the teacher scores every token of them in one
forward, and the student takes `updates` optimizer steps on them (distill/onpolicy.py),
with a share λ of each batch drawn from the teacher's stored episodes.

  sad-jax opd --config configs/train_opd.py --workdir runs/opd \\
      --config.student=runs/study/cells/sad_s0_n200/final \\
      --config.teacher=runs/study/teacher/final

Sections as in train.py: mesh → models → environments and data → state → step →
checkpoint → rounds. A round's draws (its tasks, each episode's sampling key, the
minibatch order) are functions of (seed, round), and a checkpoint is written at the end
of each round with the round index and the spent budgets, so a run killed anywhere in a
round redoes that round from its start and ends bit-identical to one never killed (on
the same machine).

The update and the teacher's scoring run on the (data, fsdp, tensor) mesh: parameters
and optimizer moments by their logical axes (trainer/train.state_shardings), episode rows
over the batch axes. Rollouts run on the same mesh; with several processes each plays
its contiguous share of the round's episodes on its own devices (an episode's draws
depend on its key, not on who plays it), and the rows are gathered so that every process
builds the same global batches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sad_jax.agent import rollout
from sad_jax.agent.envs.registry import make_env
from sad_jax.common import fileio, sharding
from sad_jax.common.errors import DataError
from sad_jax.data import schema
from sad_jax.distill import onpolicy
from sad_jax.models import checkpoint_io, lora, transformer
from sad_jax.trainer import checkpoint as ckpt_lib
from sad_jax.trainer import step as step_lib
from sad_jax.trainer.setup import mesh_from_config
from sad_jax.trainer.train import state_shardings

BUDGETS = ("train_steps", "generated_tokens", "teacher_tokens", "guided_tokens", "rollout_s",
           "score_s", "update_s", "eval_s")


def depth_at(stages, round_index: int) -> int:
  """Teacher-prefix turns d for a round: stages are (from_round, d) pairs, the last one
  whose from_round ≤ round applies (d shrinks as the rounds go: a depth curriculum)."""
  d = 0
  for start, depth in sorted(tuple(s) for s in stages):
    if round_index >= int(start):
      d = int(depth)
  return d


def guide_at(guide, round_index: int) -> float:
  """The chance that the teacher plays a turn in this round's rollouts: `guide.prob`,
  decaying linearly to 0 at round `guide.decay_rounds` (0: no decay)."""
  p, n = float(guide.prob), int(guide.decay_rounds)
  return p * max(0.0, 1.0 - round_index / n) if n > 0 else p


def opd_step(state: step_lib.TrainState, batch: dict, scores: dict, base=None, *, cfg,
             vocab: int, tx, s: onpolicy.OPDSettings, dtype=jnp.float32,
             spec: lora.LoraSpec | None = None):
  """One optimizer update on [b, T] episode rows. Returns (state, metrics). With `spec`,
  state.params are LoRA adapters on the frozen `base`."""
  t = onpolicy.targets(batch)

  def loss_fn(params):
    lp = onpolicy.log_probs(cfg, step_lib.student_params(params, base, spec), t, vocab=vocab,
                            dtype=dtype)
    return onpolicy.loss_and_metrics(lp, batch, scores, s=s)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = {"model": grads, "span": jnp.zeros_like(state.span_params)}
  updates, opt_state = tx.update(grads, state.opt_state, step_lib.trainable(state))
  new = jax.tree.map(jnp.add, step_lib.trainable(state), updates)
  metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
  return dataclasses.replace(state, step=state.step + 1, params=new["model"],
                             opt_state=opt_state), metrics


def _stack(rows: list[dict]) -> dict:
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def _take(arrays: dict, idx) -> dict:
  return {k: v[idx] for k, v in arrays.items()}


def teacher_rows(trajectories, tokenizer, seq_len: int) -> dict:
  """The teacher's stored episodes as rows of the same form, marked off-policy."""
  eps = []
  for traj in trajectories:
    ids, kinds = rollout.encode_segments(tokenizer, traj.segments, bos=tokenizer.bos_id
                                         is not None)
    eps.append(rollout.Episode(task=int(traj.meta.get("task", -1)), ids=ids.tolist(),
                               kinds=kinds.tolist(), logp=[0.0] * len(ids),
                               mine=[False] * len(ids), turn=[-1] * len(ids),
                               won=bool(traj.success)))
  arr = rollout.to_arrays(eps, seq_len)
  arr["offpolicy_b"][:] = True
  return arr


def per_turn_rkl(arr: dict, scores: dict, max_turns: int) -> list[float | None]:
  """Mean sampled reverse KL (ℓ_old − ℓ_T) per token, by the student's turn index."""
  k = np.asarray(arr["logp"][:, 1:]) - np.asarray(scores["teacher_logp"])
  mine = arr["mine"][:, 1:] & (arr["offpolicy_b"][:, None] == 0)
  turn = arr["turn"][:, 1:]
  return [float(k[mine & (turn == i)].mean()) if (mine & (turn == i)).any() else None
          for i in range(max_turns)]


def _load_models(config, mesh):
  # with several processes orbax restores onto the mesh (each process reads its shards)
  mesh = mesh if jax.process_count() > 1 else None
  teacher_cfg, teacher_params = checkpoint_io.load_model(config.teacher, mesh=mesh)
  tok_path = config.tokenizer or (fileio.join(config.student, "tokenizer.model")
                                  if config.student else "")
  if not tok_path:
    raise DataError("opd from initialisation needs --config.tokenizer", field="tokenizer")
  from sad_jax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(tok_path)
  if config.student:
    cfg, params = checkpoint_io.load_model(config.student, mesh=mesh)
  else:
    from sad_jax.models.config import from_hf_dict
    hf = {**dict(config.student_hf_config), "vocab_size": tok.vocab_size}
    cfg = from_hf_dict(hf, where="config.student_hf_config")
    params = transformer.init_params(cfg, jax.random.PRNGKey(config.seed))
  for name, c in (("student", cfg), ("teacher", teacher_cfg)):
    if c.vocab_size < tok.vocab_size:
      raise DataError(f"{name} vocabulary {c.vocab_size} is smaller than the tokenizer's "
                      f"{tok.vocab_size}", field=f"config.{name}")
  return (cfg, params), (teacher_cfg, teacher_params), tok, tok_path


def rollout_layout(mesh, rules):
  """Where this process plays: the whole mesh in one process; with several, its own
  devices, keeping the mesh's tensor axis where they hold it (the rest on data)."""
  if jax.process_count() == 1:
    return mesh, rules
  n, tensor = jax.local_device_count(), int(mesh.shape["tensor"])
  tensor = tensor if n % tensor == 0 else 1
  return sharding.make_mesh((n // tensor, 1, tensor), devices=jax.local_devices()), rules


def row_shardings(rows: dict, mesh, rules) -> dict:
  """[B, …] arrays: rows over the batch axes (data, fsdp), the rest replicated."""
  return {k: sharding.sharding_for(np.shape(v), ("batch",) + (None,) * (np.ndim(v) - 1),
                                   mesh, rules) for k, v in rows.items()}


def place(tree, shardings):
  """Host values, the same on every process, as global arrays with these shardings (each
  process fills only its devices' pieces); global arrays are resharded."""
  def one(x, sh):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.jit(lambda y: y, out_shardings=sh)(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)


def to_host(tree):
  """Global arrays (or per-process host arrays, concatenated on axis 0) as NumPy on
  every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def share(n: int, *, field: str) -> slice:
  """This process's contiguous share of n episodes."""
  p, i = jax.process_count(), jax.process_index()
  if n % p:
    raise DataError(f"{n} episodes do not split over {p} processes", field=field)
  return slice(i * n // p, (i + 1) * n // p)


def play_share(cfg, params, tok, envs, jobs, *, settings, seed, stop, layout, field,
               teacher=None) -> tuple[list[rollout.Episode], np.ndarray]:
  """This process plays its share of `jobs` (episode keys: their index in `jobs`);
  `teacher` (cfg, params) plays the guided turns, its params on this process's devices.
  Returns its episodes and, for every job of every process, [won, the student's turns,
  its invalid turns, its tokens, guided turns, guided tokens]."""
  mine = [dataclasses.replace(j, key_id=i) for i, j in enumerate(jobs)][share(
      len(jobs), field=field)]
  params = params if jax.process_count() == 1 else to_host(params)
  eps, _ = rollout.play(cfg, params, tok, envs, mine, settings=settings, seed=seed,
                        stop_ids=stop, layout=layout, teacher=teacher)
  summary = np.asarray([[e.won, e.steps - sum(e.guided),
                         sum(b and not g for b, g in zip(e.turn_invalid, e.guided)),
                         sum(e.mine), sum(e.guided),
                         sum(e.by_teacher())]
                        for e in eps], np.int64).reshape(-1, 6)
  return eps, to_host(summary)


def _evaluate(cfg, params, tok, envs, tasks, config, stop, layout) -> dict:
  """Greedy episodes on held-out tasks: success and invalid-action rates."""
  r = config.rollout
  settings = rollout.RolloutSettings(max_new_tokens=r.max_new_tokens,
                                     max_steps=config.eval.max_steps, max_len=r.max_len,
                                     temperature=0.0, chunk=r.chunk)
  _, summary = play_share(cfg, params, tok, envs, [rollout.Job(t) for t in tasks],
                          settings=settings, seed=0, stop=stop, layout=layout,
                          field="config.eval.episodes")
  return {"success": float(summary[:, 0].mean()),
          "invalid_rate": float(summary[:, 2].sum() / max(summary[:, 1].sum(), 1))}


def train_onpolicy(config, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) the rounds; returns the last round's metrics and the budgets."""
  import orbax.checkpoint as ocp

  # ---- mesh
  mesh, rules = mesh_from_config(config)
  layout, is_main = rollout_layout(mesh, rules), jax.process_index() == 0

  # ---- models
  (cfg, params), (t_cfg, t_params), tok, tok_path = _load_models(config, mesh)
  vocab, dtype = int(tok.vocab_size), jnp.float32
  settings = onpolicy.check(onpolicy.OPDSettings(**dict(config.loss)))
  stop = [tok.eos_id] if tok.eos_id is not None else []

  # ---- environments and data
  envs = [make_env(config.env) for _ in range(int(config.rollout.slots))]
  train_tasks = envs[0].tasks("train")
  eval_tasks = envs[0].tasks(config.eval.split)[:int(config.eval.episodes)]
  stored = schema.read_jsonl(config.teacher_data) if config.teacher_data else []
  by_task = {int(t.meta["task"]): t for t in stored if "task" in t.meta}
  lam, seq_len = float(config.mix.teacher_share), int(config.rollout.max_len)
  if lam and not stored:
    raise DataError("mix.teacher_share > 0 needs --config.teacher_data (the teacher's "
                    "episodes, JSONL)", field="config.teacher_data")
  off_rows = teacher_rows(stored, tok, seq_len) if lam else None
  t_params = place(t_params, sharding.tree_shardings(t_params, transformer.param_axes(t_params),
                                                     mesh, rules))
  # the guided turns' teacher, on this process's devices (gathered once: it is fixed)
  guide_teacher = (None if not float(config.guide.prob) else
                   (t_cfg, t_params if jax.process_count() == 1 else to_host(t_params)))

  # ---- state (with LoRA: the adapters; the frozen base stays outside it)
  rounds, updates, batch = int(config.rounds), int(config.updates), int(config.batch)
  tx = step_lib.make_optimizer(config.optim, rounds * updates)
  spec = lora.from_config(config.get("lora"))
  base, base_fp = None, None
  if spec is not None:
    if not config.student:
      raise DataError("LoRA rounds adapt a loaded student: set --config.student (or "
                      "lora.rank=0)", field="config.lora.rank")
    base = lora.prepare_base(params, spec)
    base = place(base, sharding.tree_shardings(base, transformer.param_axes(base), mesh, rules))
    base_fp = {"path": fileio.abspath(config.student),
               "fingerprint": lora.fingerprint_files(fileio.abspath(config.student))}
    params = lora.init_adapters(base, spec, jax.random.fold_in(
        jax.random.key(int(config.seed)), 1))
  state = step_lib.init_state(params, jnp.zeros((1,), jnp.float32), tx, int(config.seed))
  state_sh = state_shardings(state, mesh, rules, tx)
  state = place(state, state_sh)

  def policy(st):
    """The parameters the rollouts and evaluations play: the student, or base + adapters
    merged (one dense model: the decoding loop needs no LoRA path)."""
    if spec is None:
      return st.params
    with on_mesh():
      return merge(base, st.params)

  merge = jax.jit(functools.partial(lora.merge, spec=spec)) if spec is not None else None

  # ---- step: the batches come placed (rows on the batch axes), so jit keeps their layout
  step = jax.jit(functools.partial(opd_step, cfg=cfg, vocab=vocab, tx=tx, s=settings,
                                   dtype=dtype, spec=spec), out_shardings=(state_sh, None),
                 donate_argnums=(0,))
  score = jax.jit(functools.partial(onpolicy.score, cfg=t_cfg, vocab=vocab,
                                    k=int(config.teacher_k), dtype=dtype))
  on_mesh = functools.partial(sharding.use_mesh, mesh, rules)
  rows_on_mesh = lambda rows: place(rows, row_shardings(rows, mesh, rules))

  # ---- checkpoint
  ckpt_dir = fileio.join(fileio.abspath(workdir), "checkpoints")
  mgr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True), item_names=("state", "meta"))
  start, spent = 0, dict.fromkeys(BUDGETS, 0.0)
  if mgr.latest_step() is not None:
    abstract = ckpt_lib.abstract_with_shardings(state, state_sh)
    got = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state, start = got["state"], int(got["meta"]["round"])
    if got["meta"].get("lora_base") != base_fp:  # adapters mean nothing on another base
      raise DataError(f"the checkpoint's LoRA base was {got['meta'].get('lora_base')}, now "
                      f"{base_fp}", path=ckpt_dir, field="lora_base")
    spent |= got["meta"]["spent"]   # a budget added since that checkpoint starts at 0
    if is_main:
      print(f"resumed from round {start}", flush=True)
  off_scores = None
  if lam:  # the teacher and its stored episodes are fixed: scored once, not every round
    with on_mesh():
      off_scores = to_host(score(t_params, rows_on_mesh(off_rows)))
    if start == 0:
      spent["teacher_tokens"] += int(off_rows["segment_ids"].sum())
  log_path = fileio.join(workdir, "rounds.jsonl")
  if is_main:
    _keep_rounds(log_path, start)
  last: dict[str, Any] = {}

  # ---- rounds
  try:
    if start == 0 and config.eval.every:  # the starting point, for the curve
      ev = _evaluate(cfg, policy(state), tok, envs, eval_tasks, config, stop, layout)
      if is_main:
        _append(log_path, {"round": -1, f"{config.eval.split}_success": ev["success"],
                           f"{config.eval.split}_invalid_rate": ev["invalid_rate"]})
      if progress and is_main:
        print(f"round 0/{rounds}: {config.eval.split} success {ev['success']:.3f}, invalid "
              f"{ev['invalid_rate']:.3f}", flush=True)
    for r in range(start, rounds):
      rng = np.random.default_rng([int(config.seed), r])
      depth = depth_at(config.depth, r)
      # a depth stage plays the tasks whose teacher episode it can start from
      pool = [t for t in train_tasks if int(t) in by_task] if depth else list(train_tasks)
      if len(pool) < int(config.rollout.episodes):
        raise DataError(f"round {r}: depth {depth} needs {config.rollout.episodes} train tasks "
                        f"with a teacher episode; teacher_data has {len(pool)}",
                        path=config.teacher_data or None, field="config.depth")
      picks = rng.choice(len(pool), int(config.rollout.episodes), replace=False)
      jobs = [rollout.Job(int(pool[i]), prefix=_prefix(by_task.get(int(pool[i])), depth))
              for i in picks]
      guide = guide_at(config.guide, r)
      t0 = time.perf_counter()
      eps, summary = play_share(cfg, policy(state), tok, envs, jobs,
                                settings=_settings(config, guide),
                                seed=int(rng.integers(1 << 31)), stop=stop, layout=layout,
                                field="config.rollout.episodes",
                                teacher=guide_teacher if guide > 0 else None)
      arr = to_host(rollout.to_arrays(eps, seq_len))   # every process's rows, in job order
      t1 = time.perf_counter()
      with on_mesh():
        scores = to_host(score(t_params, rows_on_mesh(arr)))
      t2 = time.perf_counter()
      metrics = []
      n_off = round(lam * batch)
      for _u in range(updates):
        on = rng.choice(len(jobs), batch - n_off, replace=len(jobs) < batch - n_off)
        rows, sc = [_take(arr, on)], [_take(scores, on)]
        if n_off:
          off = rng.choice(len(off_rows["ids"]), n_off, replace=False)
          rows.append(_take(off_rows, off))
          sc.append(_take(off_scores, off))
        with on_mesh():
          state, m = step(state, rows_on_mesh(_stack(rows)), rows_on_mesh(_stack(sc)), base)
        metrics.append(to_host(m))
      t3 = time.perf_counter()
      spent["train_steps"] += updates
      spent["generated_tokens"] += int(summary[:, 3].sum())
      spent["guided_tokens"] += int(summary[:, 5].sum())
      spent["teacher_tokens"] += int(arr["segment_ids"].sum())
      spent["rollout_s"] += t1 - t0
      spent["score_s"] += t2 - t1
      spent["update_s"] += t3 - t2
      last = {"round": r, "depth": depth, "guide_prob": guide,
              "guided_turns": float(summary[:, 4].sum()
                                    / max(summary[:, 1].sum() + summary[:, 4].sum(), 1)),
              "train_success": float(summary[:, 0].mean()),
              "invalid_rate": float(summary[:, 2].sum() / max(summary[:, 1].sum(), 1)),
              "rkl_per_turn": per_turn_rkl(arr, scores, int(config.rollout.max_steps)),
              **{k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}}
      if config.eval.every and ((r + 1) % int(config.eval.every) == 0 or r + 1 == rounds):
        t4 = time.perf_counter()
        ev = _evaluate(cfg, policy(state), tok, envs, eval_tasks, config, stop, layout)
        spent["eval_s"] += time.perf_counter() - t4
        last |= {f"{config.eval.split}_success": ev["success"],
                 f"{config.eval.split}_invalid_rate": ev["invalid_rate"]}
      last["spent"] = dict(spent)
      if is_main:
        _append(log_path, last)
      if progress and is_main:
        print(_line(last, rounds, config.eval.split), flush=True)
      mgr.save(r + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave({"round": r + 1, "spent": spent, "lora_base": base_fp})))
      mgr.wait_until_finished()
  finally:
    for env in envs:
      env.close()
    mgr.close()

  # ---- final model
  final = fileio.join(workdir, "final")
  if spec is not None:  # adapters first: final/config.json is the folder's commit point
    lora.save_adapters(fileio.join(final, lora.ADAPTERS), state.params, spec, base=base_fp,
                       init="pretrained")
  checkpoint_io.save_params(final, cfg, policy(state))   # every process its shards
  if is_main:
    fileio.copyfile(tok_path, fileio.join(final, "tokenizer.model"))
  return {"rounds": rounds, "last": last, "spent": spent, "final": final}


def _prefix(traj, depth: int) -> list[tuple[str, str]]:
  """The first `depth` (thought, action) pairs of a stored teacher episode, leaving at
  least its last turn to the student."""
  if traj is None or depth <= 0:
    return []
  segs = traj.segments
  pairs = [(segs[i].text, segs[i + 1].text) for i in range(len(segs) - 1)
           if segs[i].kind == "reason" and segs[i + 1].kind == "action"]
  return pairs[:min(depth, max(len(pairs) - 1, 0))]


def _settings(config, guide: float = 0.0) -> rollout.RolloutSettings:
  r = config.rollout
  return rollout.RolloutSettings(max_new_tokens=int(r.max_new_tokens),
                                 max_steps=int(r.max_steps), max_len=int(r.max_len),
                                 temperature=float(r.temperature), chunk=int(r.chunk),
                                 guide_prob=guide,
                                 guide_temperature=float(config.guide.temperature))


def _keep_rounds(path: str, start: int) -> None:
  """The log's rounds before `start` (a killed round may have logged before its save);
  none at 0 (the starting point, round −1, is evaluated again)."""
  if not fileio.exists(path):
    return
  lines = [] if start == 0 else [ln for ln in fileio.read_text(path).splitlines()
                                 if ln.strip() and json.loads(ln)["round"] < start]
  with fileio.atomic_write(path) as f:
    f.write("".join(ln + "\n" for ln in lines))


def _append(path: str, record: dict) -> None:
  with fileio.open_file(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _line(m: dict, rounds: int, split: str) -> str:
  kl = ", ".join("-" if x is None else f"{x:.2f}" for x in m["rkl_per_turn"])
  dev = f", {split} success {m[f'{split}_success']:.3f}" if f"{split}_success" in m else ""
  guide = f", guided {m['guided_turns']:.2f}" if m["guide_prob"] else ""
  return (f"round {m['round'] + 1}/{rounds}: depth {m['depth']}{guide}, train success "
          f"{m['train_success']:.3f}, invalid {m['invalid_rate']:.3f}, loss {m['loss']:.4f}, "
          f"rKL per turn [{kl}]{dev}")
