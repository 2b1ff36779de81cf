"""``hcpass demo``: train a small byte-level GPT on Python's standard library, plain,
converted with several manifolds and converted to Attention Residuals, and compare them.

Every variant starts from the same initial weights (one initialised model, deep-copied),
sees the same batches in the same order and trains for the same number of steps with the
same optimizer settings; the only difference is `hcpass.convert`. At the end it prints a
table (train loss, held-out loss, ms/step, parameters), says which variants did worse than
the plain model, and writes ``results.json`` and pictures to ``--out``.

- `gpt`: the pre-norm GPT (also the test suite's and the CPU benchmarks' toy GPT);
- `corpus`: the stdlib byte corpus and its batches;
- `train`: the optimizer, schedule, training loop, evaluation and progress line;
- `variants`: training the plain model and one converted copy per variant (manifold or
  ``attnres``);
- `report`: the results table, the verdicts and the pictures;
- `options`: the command-line flags, the configs they give, and which variants to run;
- `run`: ``hcpass demo`` itself.

Nothing is imported here, so the command line can read the flags (`options`) without
loading the rest.
"""
