"""Stage 3, the runtime: the converted model as an ``nn.Module``.

- `module`: `ConvertedModule`, which owns the original parameters and the mixers, captures
  each graph its forward calls, rewrites it once and runs it (eagerly, or through the
  ``hcpass`` backend under ``torch.compile``);
- `mixer`: `Mixer`, one site's learned coefficients;
- `handoff`: carries a chain's n streams across graph breaks.
"""
