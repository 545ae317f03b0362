"""The comparison study on TextWorld-Express coin (search four rooms for a coin).

  sad-jax study --config configs/study_coin.py               # the study (hours on 2 cores)
  sad-jax study --config configs/study_coin.py:rooms6        # the second environment
  sad-jax study --config configs/study_coin.py:opd           # on-policy arms (4 rooms)
  sad-jax study --config configs/study_coin.py:opd_rooms6    # on-policy arms (6 rooms)
  sad-jax study --config configs/study_coin.py --teachers --config.teacher.draws=8
                                        # only the teacher: how far 8 draws of it spread
  sad-jax demo                                                # = this file's "demo" plan
  sad-jax demo --quick                                        # = "quick": a smoke run

Arms: sad (fixed span weights, one stage) against token_kd and sft at four budgets and
five seeds; SAD's components (learnable span weights, PCGrad, curriculum stages with the
complexity term) at three seeds and the budget chosen for sad on the dev fold.
"""

import ml_collections

ENV = "twx:coin?numLocations={rooms}&numDistractorItems=0&includeDoors=0&limitInventorySize=0"
# Two heads of 64 or 96: on a CPU the per-head softmax work bounds a step at these widths.
TEACHER = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
               num_attention_heads=2, num_key_value_heads=1)
STUDENT = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1)


# TWX coin's test kitchens differ from train and dev by one sentence, in every test game (the
# only test-fold sentence that no train-fold episode shows: agent/folds.py). The study plays
# the test fold again with it put back as the train kitchens have it (a counterfactual fold).
TABLE_TO_CUPBOARD = ("In one part of the room you see a dining table, that has nothing on it."
                     "=>In one part of the room you see a kitchen cupboard that is closed.")


def arm(name, objective, *, seeds, budgets=(), overrides=(), curriculum=False, start=""):
  """An arm; objective "opd": on-policy rounds (budgets: rounds) from the final model of
  arm `start`'s cell of the same seed, or from initialisation."""
  return ml_collections.ConfigDict(dict(name=name, objective=objective, seeds=tuple(seeds),
                                        budgets=tuple(budgets), overrides=tuple(overrides),
                                        curriculum=curriculum, start=start))


# On-policy arms (`sad-jax study --config configs/study_coin.py:opd`). sad+opd keeps SAD's
# split on the student's own tokens (each span normalised by its own count); token_kd+opd is
# flat over every generated token; gkd mixes the teacher's episodes into half of each batch;
# sad+guided is sad+opd with teacher intervention (half the turns the teacher's in round 0,
# 0.025 in round 19, the last); its turns are targets too: DAgger's labels in the student's
# states.
OPD_ARMS = (
    ("sad+opd", "sad", ("loss.per_span=True",)),
    ("sad+guided", "sad", ("loss.per_span=True", "guide.prob=0.5", "guide.decay_rounds=20",
                           "loss.guided_targets=True")),
    ("token_kd+opd", "token_kd", ()),
    ("opd", "", ()),
    ("gkd", "", ("mix.teacher_share=0.5", "loss.sampled_weight=0.0", "loss.full_weight=1.0")),
)


def _opd_rounds(c: ml_collections.ConfigDict) -> None:
  """The settings of every opd arm's rounds. lr chosen on the 4-room dev fold (64 games,
  from the demo's sad_s0_n200 at 0.688, 20 rounds; docs/onpolicy.md): at 3e-4 every setting
  fell to 0.41–0.58, at 1e-4 and 3e-5 none moved outside 0.58–0.73; 3e-5 (gkd: 0.72 at
  round 20) was the steadiest."""
  c.opd_overrides = ("optim.lr=3e-5", "loss.full_weight=1.0", "eval.every=5")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "rooms6", "demo", "quick", "opd", "opd_quick", "opd_rooms6"):
    raise ValueError(f"unknown argument {arg!r}; expected rooms6, demo, quick, opd, "
                     "opd_quick or opd_rooms6")
  c = ml_collections.ConfigDict()
  c.name = "coin" if arg is None else f"coin_{arg}"
  rooms = 6 if arg in ("rooms6", "opd_rooms6") else 4
  c.env = ENV.format(rooms=rooms)
  c.protocol = "teacher"          # teacher: students learn from the teacher's own episodes;
  #                                 oracle: from the expert's (a separately labelled condition)
  c.expert = ml_collections.ConfigDict(dict(episodes=800, noise=0.1, vary_rooms=True))
  c.tokenizer = ml_collections.ConfigDict(dict(vocab=600, multiword=True))
  c.data = ml_collections.ConfigDict(dict(seq_len=512 if rooms == 4 else 1024, batch=4,
                                          pack_lookahead=1))
  # 300 steps, chosen on dev (64 games): 89.1% success, 18% invalid actions; at 150 steps
  # 59.4% (with a warm-up curriculum stage) and 44.1% (without, on train-fold games)
  # seed: one teacher is one random draw; runs with other seeds (--config.teacher.seed=1
  # --replicate RUN) are pooled over teacher draws by `sad-jax pool-runs`. draws: train
  # seeds seed … seed+draws−1 and keep the best on dev (6 rooms: seeds 0–2 won 2, 40 and 18
  # of 64 dev games on one machine, where 4 rooms' won 64, 60 and 59)
  c.teacher = ml_collections.ConfigDict(dict(model=TEACHER, steps=300, lr=3e-3,
                                             curriculum=False, seed=0, draws=1))
  if rooms == 6:
    # 8 draws of this teacher on one machine won 6–81% of the test games, 3 of them under a
    # third (`sad-jax study --config configs/study_coin.py:rooms6 --teachers
    # --config.teacher.draws=8`, docs/study/teacher_draws/): the best on dev of 3 is kept
    c.teacher.draws = 3
  c.teacher_data = ml_collections.ConfigDict(dict(train_games=640, keep="success"))
  c.store_k = 16
  # the narrower student at twice the teacher's peak learning rate, the same for every arm
  c.student = ml_collections.ConfigDict(dict(model=STUDENT, lr=6e-3))
  main = dict(seeds=range(5), budgets=(100, 200, 400, 600))
  c.arms = (
      arm("sad", "sad", **main),
      arm("token_kd", "token_kd", **main),
      arm("sft", "sft", **main),
      arm("sad+learnable", "sad", seeds=range(3), overrides=("objective.learnable_weights=True",)),
      arm("sad+pcgrad", "sad", seeds=range(3), overrides=("objective.pcgrad=True",)),
      arm("sad+curriculum", "sad", seeds=range(3), curriculum=True),
  )
  # an arm whose best mean dev success is at its largest budget (its curve still rising)
  # trains these next, in turn, until it is not; 800 caps a cell at about 7 min on 2 cores
  c.more_budgets = (800,)
  c.reference = "sad"
  c.eval = ml_collections.ConfigDict(dict(dev_games=64, test_games=128, max_steps=8 + 4 * (
      rooms == 6), batch=32, max_new_tokens=48, max_prompt_tokens=1024,
                                          test_rewrite=(TABLE_TO_CUPBOARD,)))
  if arg == "demo":  # the README's first command: ≤ 15 min on 2 cores
    # Playing games is most of its time (about 1 game/s for batch 32): 192 teacher games
    # took 2.9 of 15.2 min, and the seven models' 64 test games about 7: 48 test games leave
    # a margin under 15 min. 200 steps is on the study's dev curve within a
    # few points of its plateau (400–600 steps).
    c.teacher_data.train_games = 160
    c.arms = tuple(arm(n, n, seeds=range(2), budgets=(200,)) for n in ("sad", "token_kd", "sft"))
    c.eval.dev_games, c.eval.test_games = 32, 48
    c.eval.test_rewrite = ()  # the 15-minute budget: the study's reports show it
  if arg in ("opd", "opd_quick"):
    # the demo's stages and its two off-policy starts, then the on-policy arms; the rounds'
    # settings (lr, the full-distribution term) were chosen on the dev fold
    c.teacher_data.train_games = 160
    c.eval.dev_games, c.eval.test_games = 32, 48
    c.eval.test_rewrite = ()
    rounds, steps = (20, 200) if arg == "opd" else (2, 12)
    c.arms = (arm("sad", "sad", seeds=range(2), budgets=(steps,)),
              arm("token_kd", "token_kd", seeds=range(2), budgets=(steps,)),
              *(arm(n, "opd", seeds=range(2), budgets=(rounds,), start=start, overrides=o)
                for n, start, o in OPD_ARMS))
    c.reference = "sad+opd"
    _opd_rounds(c)
  if arg == "opd_rooms6":
    # the on-policy arms on the second environment. The off-policy starts train the budget
    # the 6-room study chose on its dev fold for sad and token_kd (400 steps) on half its
    # train games; the rounds' settings are the 4-room dev fold's (not chosen again here)
    c.teacher_data.train_games = 320
    c.eval.dev_games, c.eval.test_games = 32, 48
    c.eval.test_rewrite = ()
    c.arms = (arm("sad", "sad", seeds=range(2), budgets=(400,)),
              arm("token_kd", "token_kd", seeds=range(2), budgets=(400,)),
              *(arm(n, "opd", seeds=range(2), budgets=(20,), start=start, overrides=o)
                for n, start, o in OPD_ARMS))
    c.reference = "sad+opd"
    _opd_rounds(c)
  if arg == "opd_quick":
    c.expert.episodes, c.teacher.steps = 100, 20
    c.teacher_data.train_games, c.teacher_data.keep = 16, "all"
    c.data.batch = 2
    c.eval.dev_games, c.eval.test_games, c.eval.max_steps = 4, 4, 4
    c.opd_overrides = (*c.opd_overrides, "rollout.episodes=4", "rollout.slots=4",
                       "updates=2", "batch=2", "eval.every=1")
  if arg == "quick":  # a smoke run of every stage (≈ 3 min): no figure means anything
    c.expert.episodes = 100
    c.teacher.steps = 20
    c.teacher_data.train_games, c.teacher_data.keep = 16, "all"
    c.data.batch = 2
    c.arms = tuple(arm(n, n, seeds=(0,), budgets=(12,)) for n in ("sad", "token_kd", "sft"))
    c.eval.dev_games, c.eval.test_games, c.eval.max_steps = 4, 4, 4
    c.eval.test_rewrite = ()
  return c
