"""Stage 4, the lowering: the ``hcpass`` torch.compile backend.

- `backend`: the entry point (``torch.compile(model, backend="hcpass")``): rewrites the graph
  Dynamo hands it (through the runtime), runs the passes, and hands the result to Inductor;
- `passes`: graph passes run before Inductor (CPU: mixer ops replaced by their references;
  CUDA: neighbouring sites' ops fused into one generated kernel).

The ops themselves live in ``hcpass.ops`` (references, autograd) and ``hcpass.codegen``
(generated Triton kernels).
"""
