"""Claims 5, 6 and 8, what the experts become: the mutual-information loss
specializes them, extracting a task's experts keeps its accuracy, and the extracted
sub-network serves the task faster than the full token-routed MoE."""

from __future__ import annotations

import os

import numpy as np

from multitask_moe.experiments.catalogue import TASKS
from multitask_moe.experiments.claim import EXTRACTED, Claim, Context, task_accuracy
from multitask_moe.experiments.stats import Check, Compare


# 5. The mutual-information loss specializes experts.
def usage_statistics(workdir: str) -> dict[str, float]:
    """Mean over sparse layers of the tasks' mean effective experts and of I(T; E) in
    nats, from the usage statistics (choice counts, EMA) of a trained workdir."""
    from multitask_moe import lifecycle
    from multitask_moe.moe import losses, usage
    from multitask_moe.train.train import usage_tables

    restored = lifecycle.restore(workdir, mesh={"data": 1, "expert": 1}, compile_eval=False)
    tables = usage_tables(restored.experiment.model.spec, restored.state)
    effective = [float(np.mean(usage.effective_experts(t))) for t in tables.values()]
    information = [float(-losses.mutual_info_loss(t)) for t in tables.values()]
    return {
        "effective_experts": float(np.mean(effective)),
        "mutual_info": float(np.mean(information)),
    }


def measure_mi_loss(ctx: Context, seed: int) -> dict:
    out = {}
    for arm, run in (("with", "mixture/mod_squad"), ("without", "mixture/mod_squad_no_mi")):
        for key, value in usage_statistics(ctx.workdir(run, seed)).items():
            out[f"{key}_{arm}"] = value
        out[f"accuracy_{arm}"] = ctx.metrics(run, seed)["test/mean_accuracy"]
    return out


MI_LOSS = Claim(
    name="mi_loss",
    number=5,
    title="The mutual-information loss specializes experts",
    paper=(
        "Mod-Squad (Chen et al. 2022, arXiv:2212.08066): "
        "maximizing I(T; E) makes each task use a few experts (a sparse "
        "task x expert usage matrix) without costing accuracy."
    ),
    setting=(
        "configs/default.py:mod_squad (MoA in blocks 0 and 2, MoE in 1 and 3, 8 experts "
        "top-2, per-task routers, uncertainty task weighting), {multitask_steps} steps, "
        "MI weight 0.005 against 0. From the usage statistics (an EMA of each task's "
        "expert choices): effective experts per task = exp(entropy of its usage row), "
        "between 2 (top-2 on two experts) and 8; I(T; E) in nats (at most ln 8 = 2.08); "
        "both averaged over the 4 sparse layers."
    ),
    measure=measure_mi_loss,
    rows=(
        ("effective experts per task, with MI loss", "effective_experts_with"),
        ("effective experts per task, without", "effective_experts_without"),
        ("I(T; E), with MI loss", "mutual_info_with"),
        ("I(T; E), without", "mutual_info_without"),
        ("mean test accuracy, with MI loss", "accuracy_with"),
        ("mean test accuracy, without", "accuracy_without"),
    ),
    compares=(
        Compare(
            "fewer effective experts with the loss",
            "effective_experts_with",
            "effective_experts_without",
            "<",
        ),
        Compare("higher I(T; E) with the loss", "mutual_info_with", "mutual_info_without", ">"),
        Compare("accuracy higher with the loss", "accuracy_with", "accuracy_without", ">"),
    ),
)


# 6. Extraction keeps accuracy.
def measure_extraction(ctx: Context, seed: int) -> dict:
    out = {}
    for variant in EXTRACTED:
        summaries = [ctx.extraction(variant, task, seed) for task in TASKS]
        out[f"{variant}/full"] = float(np.mean([s["accuracy_full"]["test"] for s in summaries]))
        out[f"{variant}/extracted"] = float(
            np.mean([s["accuracy_extracted"]["test"] for s in summaries])
        )
        out[f"{variant}/params_ratio"] = float(np.mean([s["params_ratio"] for s in summaries]))
        out[f"{variant}/one"] = 1.0
    return out


EXTRACTION = Claim(
    name="extraction",
    number=6,
    title="Extracting a per-task model keeps its accuracy",
    paper=(
        "Mod-Squad (Chen et al. 2022, arXiv:2212.08066): "
        "a task's sub-network (the experts it uses above a threshold) keeps the "
        "full model's accuracy on that task with a fraction of the parameters."
    ),
    setting=(
        "Every task of the claim 1 Task-MoE run (routing=task) and of the claim 5 "
        "Mod-Squad run, extracted at threshold 3 (docs/lifecycle.md); mean over the 10 "
        "tasks of test accuracy and of extracted / full parameters."
    ),
    measure=measure_extraction,
    rows=(
        ("Task-MoE: full model", "task_moe/full"),
        ("Task-MoE: extracted", "task_moe/extracted"),
        ("Task-MoE: parameter ratio", "task_moe/params_ratio"),
        ("Mod-Squad: full model", "mod_squad/full"),
        ("Mod-Squad: extracted", "mod_squad/extracted"),
        ("Mod-Squad: parameter ratio", "mod_squad/params_ratio"),
    ),
    compares=(
        Compare(
            "Task-MoE: extracted ~ full (within 0.01)",
            "task_moe/extracted",
            "task_moe/full",
            "~",
            0.01,
        ),
        Compare(
            "Mod-Squad: extracted ~ full (within 0.01)",
            "mod_squad/extracted",
            "mod_squad/full",
            "~",
            0.01,
        ),
    ),
    checks=(
        Check(
            "Task-MoE: extracted / full parameters < 1",
            "task_moe/params_ratio",
            "task_moe/one",
            "<",
        ),
        Check(
            "Mod-Squad: extracted / full parameters < 1",
            "mod_squad/params_ratio",
            "mod_squad/one",
            "<",
        ),
    ),
)


# 8. Inference of the per-task sub-network against the full token-routed MoE.
def measure_inference(ctx: Context, seed: int) -> dict:
    """The extracted model routes one sequence per group; the token-routed model is timed
    both with one-sequence groups (the headline: routing groups alike, so the ratio is the
    sub-network's) and with its configured groups."""
    from multitask_moe import lifecycle
    from multitask_moe.lifecycle import timing

    one = {"data": 1, "expert": 1}
    workdir = ctx.workdir("mixture/tokens", seed)
    tokens = lifecycle.restore(workdir, mesh=one)
    same_groups = lifecycle.load_config(workdir).copy_and_resolve_references()
    same_groups.model.moe.group_size = int(tokens.experiment.token_shape[0])
    tokens_same_groups = lifecycle.restore(workdir, same_groups, mesh=one)
    tokens_metrics = ctx.metrics("mixture/tokens", seed)
    calls = ctx.runner.scale.timing_calls
    ratios = {"same": [], "configured": []}
    extracted_acc, tokens_acc = [], []
    for task in TASKS:
        summary = ctx.extraction("task_moe", task, seed)
        out = os.path.join(ctx.runner.workdir("extracted/task_moe", seed), task.replace("/", "_"))
        extracted = lifecycle.restore(out, mesh=one)
        task_id = tokens.experiment.task_names.index(task)
        models = {
            "same": timing.Timed(tokens_same_groups, task_id, 128),
            "configured": timing.Timed(tokens, task_id, 128),
            "extracted": timing.Timed(extracted, 0, 128),
        }
        timing.run_interleaved(models, 7, calls)
        for groups in ratios:
            ratios[groups].append(timing.speedup(models[groups], models["extracted"]))
        extracted_acc.append(summary["accuracy_extracted"]["test"])
        tokens_acc.append(task_accuracy(tokens_metrics, task))
    return {
        "speedup_same_groups": float(np.median(ratios["same"])),
        "speedup_same_groups_min": float(np.min(ratios["same"])),
        "speedup": float(np.median(ratios["configured"])),
        "one": 1.0,
        "extracted_accuracy": float(np.mean(extracted_acc)),
        "tokens_accuracy": float(np.mean(tokens_acc)),
    }


INFERENCE = Claim(
    name="inference",
    number=8,
    title="Serving one task: the extracted sub-network against the full token-routed MoE",
    paper=(
        "Task-MoE (Kudugunta et al. 2021, arXiv:2110.03742): "
        "a task's sub-network serves it faster than a token-routed MoE of the "
        "same size, at the same quality."
    ),
    setting=(
        "The claim 6 Task-MoE extractions (2 of 8 experts per MoE layer) against the "
        "claim 1 token-routed MoE run: one CPU device, the same 128 test examples of the "
        "task, forward only after compile, 7 interleaved rounds of {timing_calls} calls; "
        "speedup = median per-round time ratio, median over the 10 tasks. The token-routed "
        "model is timed with one-sequence routing groups, as the extracted model routes "
        "(the headline), and with its configured groups (a second row). With --jobs the "
        "other seeds train meanwhile; interleaving exposes both models to that load alike."
    ),
    measure=measure_inference,
    rows=(
        (
            "throughput ratio extracted / token-routed, same groups (median over tasks)",
            "speedup_same_groups",
        ),
        ("smallest same-groups ratio over tasks", "speedup_same_groups_min"),
        ("throughput ratio against its configured groups (median)", "speedup"),
        ("extracted Task-MoE: mean test accuracy", "extracted_accuracy"),
        ("token-routed MoE: mean test accuracy", "tokens_accuracy"),
    ),
    compares=(
        Compare("extracted is faster (same routing groups)", "speedup_same_groups", "one", ">"),
        Compare(
            "at equal quality (within 0.01)", "extracted_accuracy", "tokens_accuracy", "~", 0.01
        ),
    ),
)
