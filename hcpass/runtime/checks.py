"""The checks at the end of each converted forward: did it run as converted?

A forward can silently lose its mixers (another backend compiled it, Dynamo fell back to
eager, a re-capture no longer finds a site, a chain was cut at a graph break). Each call
counts what ran (`hcpass.runtime.call.Run`); these checks compare that with the plan and
raise with the cause they can see.
"""

from __future__ import annotations

from hcpass.runtime.call import Run


def check_regions_ran(run: Run, regions: list[str]) -> None:
    """With compiled regions, a site outside them runs without its mixer: an error."""
    if regions and run.mixers_ran < run.lookup.runs:
        raise RuntimeError(
            f"hcpass: {run.mixers_ran} of {run.lookup.runs} mixer runs happened "
            f"with compiled regions {regions}: each residual site must lie inside a "
            "region compiled with backend='hcpass' (a site outside them, or in a region "
            "compiled by another backend, runs without its mixer). Compile every block "
            "with backend='hcpass', or the whole model: "
            "torch.compile(converted, backend='hcpass')."
        )


def check_ran(run: Run, model_name: str) -> None:
    """Raise unless the forward ran every mixer and kept every chain whole."""
    missing = sorted(run.lookup.keys - run.keys)
    problems = []
    if missing:
        problems.append(f"site(s) {', '.join(missing)} ran without their mixers")
    elif run.mixers_ran < run.lookup.runs:
        problems.append(f"{run.mixers_ran} of {run.lookup.runs} site runs had their mixers")
    if run.cuts:
        problems.append(
            f"residual chain(s) cut at {', '.join(run.cuts)}: each piece collapsed its streams"
        )
    if not problems:
        return
    raise RuntimeError(
        f"hcpass: this forward of the converted {model_name} did not run "
        f"as converted: {'; '.join(problems)}. {_cause(run)}"
    )


def _cause(run: Run) -> str:
    if replaced := run.lookup.replaced_parameters():
        return (
            f"The model no longer holds {', '.join(replaced[:3])}"
            f"{', ...' if len(replaced) > 3 else ''} as parameters, and each mixer is "
            "keyed on the parameter it was converted with: a tensor passed in its place "
            "(torch.func.functional_call, stack_module_state) is not supported; a "
            "parametrization, pruning, quantization or a replaced layer must come before "
            "hcpass.convert. To change values, write into the parameters "
            "(`param.copy_(...)`, load_state_dict)."
        )
    if run.graphs == 0 and run.compiled:
        return (
            "It was compiled by torch.compile with a backend other than 'hcpass' (only "
            "backend='hcpass' adds the mixers), Dynamo reused a graph it had compiled "
            "for a plain instance of the same class, or it ran the forward uncompiled "
            "past its recompile limit (torch._dynamo.config.recompile_limit; "
            "TORCH_LOGS=recompiles shows why it recompiled)."
        )
    if run.graphs == 0:
        return (
            "Dynamo ran the forward without capturing it (it falls back to eager past "
            "its recompile limit and for frames it skips)."
        )
    if run.notes:
        return (
            "Dynamo re-captured the forward for these inputs (new shapes, dtypes or "
            "control flow) and these adds were no longer residual sites:\n  "
            + "\n  ".join(run.notes)
        )
    if run.cuts:
        return (
            "Dynamo re-captured the forward for these inputs and a chain's stream no "
            "longer passes through every site: an op between two sites that cannot run "
            "per stream at these inputs, or one added since the conversion (a forward "
            "hook that changes a block's output: convert after adding it)."
        )
    return "Dynamo re-captured the forward for these inputs and took another path."
