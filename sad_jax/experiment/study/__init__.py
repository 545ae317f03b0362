"""`sad-jax study`: SAD against token-level KD and SFT (and SAD's own ablations) as a grid
of cells, decided with paired statistics.

  sad-jax study --config configs/study_coin.py [--workdir runs/study] [--config.a.b=v …]

The method's protocol, in stages (a rerun checks each stage's outputs and skips it):
  1. expert      oracle trajectories on the environment's train fold (they train the teacher)
  2. tokenizer   a sentencepiece model and a prepared dataset of the expert trajectories
  3. teacher     a teacher model trained on them (SFT)
  4. teacher     the teacher plays train-fold games itself; its successful episodes, as it
     data        wrote them, are the students' training data (`protocol="oracle"` distils on
                 the expert's trajectories instead: a separately labelled condition). It
                 also plays the dev-fold games: its successful ones carry the per-span
                 metrics, its score is the teacher's dev row.
  5. store       the teacher's top-k log-probs on those trajectories (reason, action, answer)
  6. cells       arm × seed × budget: a student trained on the shared dataset and store, then
                 played on the DEV fold. Each arm's budget is chosen there (best mean dev
                 success over its seeds; the smaller budget on a tie); an arm whose best is
                 its largest budget trains the next of `more_budgets` (its curve has not
                 flattened yet); arms with no budgets of their own (the ablations) take the
                 reference arm's.
  7. test        the chosen cells (and the teacher) play the TEST fold: the reported figures.
  8. report      results.jsonl (one line per cell and game), report.md with bootstrap intervals
                 over games and seeds, paired differences against the reference arm, verdicts
                 only where an interval allows one, and plots.
"""
