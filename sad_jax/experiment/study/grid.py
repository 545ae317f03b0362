"""The grid: arms from the config, their seeds and budgets, the cells they make, and the
train config of one cell; the budget chosen on dev."""

from __future__ import annotations

import fractions

import ml_collections

from sad_jax.common.errors import DataError
from sad_jax.experiment.study.cells import Cell


def arms(c: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  names = [a.name for a in c.arms]
  if len(set(names)) != len(names) or c.reference not in names:
    raise DataError(f"arms must have distinct names and include the reference "
                    f"{c.reference!r}; got {names}", field="config.arms")
  for i, a in enumerate(c.arms):
    if a.objective not in ("sad", "token_kd", "sft", "opd"):
      raise DataError(f"arm {a.name}: unknown objective {a.objective!r}",
                      field="config.arms.objective")
    start = a.get("start", "")
    if a.objective == "opd" and start and start not in [b.name for b in c.arms[:i]
                                                        if b.objective != "opd"]:
      raise DataError(f"arm {a.name}: start {start!r} is not an earlier off-policy arm",
                      field="config.arms.start")
    if a.objective == "opd" and len(a.budgets) != 1:
      raise DataError(f"arm {a.name}: an opd arm takes one budget (its rounds; settings are "
                      "chosen on dev beforehand)", field="config.arms.budgets")
  ref = next(a for a in c.arms if a.name == c.reference)
  if not ref.budgets:
    raise DataError("the reference arm needs budgets of its own", field="config.arms.budgets")
  return list(c.arms)


def budget_source(arm: ml_collections.ConfigDict, reference: str) -> str:
  """How an arm's budget is set: chosen on dev, fixed by its one budget, or the reference's."""
  return "dev" if len(arm.budgets) > 1 else "fixed" if arm.budgets else reference


def teacher_seed(c) -> int:
  """The teacher's draw (0 in configs from before it was a setting)."""
  return int(c.teacher.get("seed", 0))


def first_seeds(arm_list: list, n: int | None) -> list:
  """`--seeds N`: each arm's first N seeds (a cheaper run, e.g. another teacher draw)."""
  if n is None:
    return arm_list
  if n < 1:
    raise DataError(f"--seeds must be at least 1, got {n}", field="--seeds")
  return [ml_collections.ConfigDict({**a.to_dict(), "seeds": tuple(a.seeds)[:n]})
          for a in arm_list]


def cells_of(arm: ml_collections.ConfigDict, budgets,
             chosen: dict[str, int] | None = None) -> list[Cell]:
  """An arm's cells; an opd arm's start from its start arm's cell of the same seed at that
  arm's chosen budget (`chosen`)."""
  start = arm.get("start", "")

  def start_of(seed: int) -> str:
    if not start:
      return ""
    return Cell(arm=start, objective="", seed=seed, steps=int(chosen[start])).name
  return [Cell(arm=arm.name, objective=arm.objective, seed=int(s), steps=int(n),
               overrides=tuple(arm.overrides), curriculum=bool(arm.curriculum),
               start=start_of(int(s)))
          for n in budgets for s in arm.seeds]


def train_config(c, dataset: str, *, objective: str, model, steps: int, seed: int, lr: float,
                 store: str = "", overrides=(), curriculum: bool = False):
  """One training run of the study: the same data, batch, schedule and window for every
  arm; an arm differs only by its objective and its overrides."""
  from sad_jax.common import configlib
  from sad_jax.configs import train_base

  t = train_base.get_config(objective)
  t.dataset = dataset
  t.teacher_store = store
  t.seed = seed
  for k, v in dict(model).items():
    t.model.hf_config[k] = v
  t.data.seq_len = c.data.seq_len
  t.data.batch_size = c.data.batch
  t.data.pack_lookahead = c.data.pack_lookahead
  t.teacher.k = c.store_k
  t.objective.chunk_size = 128
  weights = (1.0, 1.0) if objective == "sad" else (1.0,)
  if curriculum:  # SAD's curriculum: simple trajectories first, and the complexity term
    warm = max(steps // 4, 1)
    t.curriculum.stages = (train_base.stage("simple", warm, (1.0, 1.0, 0.3), weights),
                           train_base.stage("all", steps - warm, (1.0, 1.0, 1.0), weights))
    t.objective.curriculum_gamma = 0.1 if objective == "sad" else 0.0
  else:
    t.curriculum.stages = (train_base.stage("all", steps, (1.0, 1.0, 1.0), weights),)
    t.objective.curriculum_gamma = 0.0
  t.optim.lr = lr
  t.optim.warmup_steps = max(steps // 10, 1)
  t.train.steps = steps
  t.train.log_every = max(steps // 20, 1)
  t.train.eval_every = steps
  t.train.eval_batches = 4
  t.train.checkpoint_every = steps
  t.checkpoint.keep = 1
  t.checkpoint.keep_best = 0
  t.metrics.mfu = False
  t.metrics.progress = True
  t.mesh.shape = (-1, 1, 1)
  configlib.apply_overrides(t, [f"--config.{o}" for o in overrides])
  t.lock()
  return t


def choose_budget(records: list[dict]) -> tuple[int, dict[int, float]]:
  """The budget with the best mean dev success over seeds (the smaller one on a tie)."""
  by: dict[int, list[fractions.Fraction]] = {}
  for r in records:  # exact rates: a tie must not be broken by float rounding
    games = r["dev"]["games"]
    by.setdefault(r["cell"]["steps"], []).append(
        fractions.Fraction(sum(bool(g["won"]) for g in games), len(games)))
  exact = {n: sum(v) / len(v) for n, v in sorted(by.items())}
  best = max(exact.values())
  return min(n for n, v in exact.items() if v == best), {n: float(v) for n, v in exact.items()}


def still_rising(own: list, budgets: dict[str, list[int]], records: dict[str, dict],
                 extra: int) -> list:
  """The arms whose best budget on dev is their largest one, smaller than `extra`."""
  return [a for a in own if extra > max(budgets[a.name]) and choose_budget(
      [records[x.name] for x in cells_of(a, budgets[a.name])])[0] == max(budgets[a.name])]


def replication_arms(arm_list: list, ref: dict, names: list[str] | None,
                     reference: str) -> list:
  """The config's arms that the earlier run tested (or the `names` among them), each with
  the earlier run's seeds; the reference arm must be among them."""
  have = [a for a in arm_list if a.name in ref["chosen"]]
  if names is not None:
    unknown = sorted(set(names) - {a.name for a in have})
    if unknown:
      raise DataError(f"arms {unknown} are not arms of both this config and the earlier run "
                      f"(it tested {sorted(ref['chosen'])})", path=ref["path"], field="arm")
    have = [a for a in have if a.name in names]
  if reference not in {a.name for a in have}:
    raise DataError(f"the reference arm {reference!r} must be replicated", path=ref["path"],
                    field="arm")
  return [ml_collections.ConfigDict({**a.to_dict(), "seeds": tuple(ref["seeds"][a.name])})
          for a in have]


def select_arms(arm_list: list, names: list[str] | None, reference: str) -> list:
  """`--arms`: run only these arms (the reference among them)."""
  if names is None:
    return arm_list
  unknown = sorted(set(names) - {a.name for a in arm_list})
  if unknown or reference not in names:
    raise DataError(f"--arms must name arms of the config, the reference {reference!r} among "
                    f"them; unknown: {unknown}", field="--arms")
  return [a for a in arm_list if a.name in names]
