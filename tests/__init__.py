"""hcpass's tests, one folder per pipeline stage (frontend, rewrite, runtime, lowering) and
shared layer (ops, manifolds), then tools, whole models (end_to_end) and the repository
itself (project). Shared helpers live here: `models` (the model zoo), `factories` (CLI
factories), `graphs` (reading a rewritten graph), `op_inputs` (inputs of the ops), `interpreter`
(the Triton interpreter worker's rounding to bf16)."""
