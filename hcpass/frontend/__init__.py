"""Stage 1, the front end: from a model to a plan of its residual sites.

- `capture`: runs the model under Dynamo and keeps each graph it calls (`CapturedGraph`);
- `sites`: finds the residual adds of one graph and groups them into chains, with a reason
  for every add it skips (`SiteAnalysis`), using the patterns of ``hcpass.patterns``;
- `regions`: opens activation-checkpoint regions so their adds are searched;
- `plan`: names the sites across all of a model's graphs and builds the `Report` (`Plan`).

Nothing here changes a graph the model runs; the rewrite (``hcpass.rewrite``) does.
"""
