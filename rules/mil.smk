# Weakly supervised slide classification: attention-based MIL (and a mean-pooling baseline) per (embedding model,
# task), patient-level cross-validation on the embedding files; attention evidence; the comparison with zero-shot
# and few-shot on the same held-out slides; deploying a saved model on this cohort.


include: "functions/mil.smk"


rule mil:
    input:
        embeddings=embedding_manifest,
        sheet=config["slides"],
    output:
        calls="results/mil/{model}/{task}/{milmodel}/calls.tsv",
        evaluation="results/mil/{model}/{task}/{milmodel}/evaluation.json",
        training="results/mil/{model}/{task}/{milmodel}/training.tsv",
        model="results/mil/{model}/{task}/{milmodel}/model.safetensors",
        attention=directory("results/mil/{model}/{task}/{milmodel}/attention"),
    params:
        task=mil_task,
        settings=mil_settings,
    log:
        "results/logs/mil/{model}/{task}/{milmodel}.log",
    threads: config["mil"]["threads"]
    resources:
        mem_mb=2048 + config["mil"]["bag_cache_mb"],
        gpu=0 if config["mil"]["device"] == "cpu" else 1,
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/mil/mil.py"


rule mil_task_calls:
    """The task's calls (results/mil/{model}/{task}/calls.tsv): those of the first of mil.models."""
    input:
        lambda wildcards: f"results/mil/{wildcards.model}/{wildcards.task}/{mil_models()[0]}/calls.tsv",
    output:
        "results/mil/{model}/{task}/calls.tsv",
    log:
        "results/logs/mil/{model}/{task}/calls.log",
    conda:
        "../envs/stats.yaml"
    shell:
        "cp {input:q} {output:q}.tmp && mv {output:q}.tmp {output:q} 2> {log:q}"


rule mil_evidence:
    input:
        calls="results/mil/{model}/{task}/{milmodel}/calls.tsv",
        attention="results/mil/{model}/{task}/{milmodel}/attention",
        sheet=config["slides"],
        cohort_qc="results/qc/cohort.tsv",  # stands for every tile file and thumbnail
    output:
        index=report(
            "results/mil/{model}/{task}/{milmodel}/evidence.tsv",
            caption="../config/report/mil_evidence.rst",
            category="4. MIL",
            subcategory="{model} / {task}",
        ),
        figures=directory("results/mil/{model}/{task}/{milmodel}/evidence"),
    params:
        n_slides=config["mil"]["evidence_slides"],
        top_n=config["mil"]["evidence_top_n"],
        style=figure_style,
    log:
        "results/logs/mil_evidence/{model}/{task}/{milmodel}.log",
    conda:
        "../envs/retrieval.yaml"
    script:
        "../scripts/mil/mil_evidence.py"


rule mil_comparison:
    input:
        zeroshot=lambda wildcards: f"results/zeroshot/{wildcards.model}/{mil_comparison_prompt_set()}/calls.tsv",
        fewshot=lambda wildcards: f"results/fewshot/{wildcards.model}/{mil_comparison_prompt_set()}/fewshot.tsv",
        mil=expand("results/mil/{{model}}/{{task}}/{milmodel}/calls.tsv", milmodel=mil_models()),
    output:
        **figure_outputs(
            "results/figures/mil/{model}/{task}/comparison",
            caption="mil_comparison.rst",
            category="4. MIL",
            subcategory="{model} / {task}",
        ),
    params:
        mil_models=mil_models(),
        seed=config["seed"],
        style=figure_style,
    log:
        "results/logs/figures/mil/{model}/{task}/comparison.log",
    conda:
        "../envs/stats.yaml"
    script:
        "../scripts/mil/mil_comparison.py"


rule mil_deploy:
    input:
        model=lambda wildcards: mil_deploy_entry(wildcards)["model_file"],
        embeddings=mil_deploy_manifest,
        sheet=config["slides"],
    output:
        calls="results/mil/deploy/{name}/calls.tsv",
        evaluation="results/mil/deploy/{name}/evaluation.json",
        attention=directory("results/mil/deploy/{name}/attention"),
    params:
        device=config["mil"]["device"],
        seed=config["seed"],
    log:
        "results/logs/mil/deploy/{name}.log",
    threads: config["mil"]["threads"]
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/mil/mil_deploy.py"


rule mil_all:
    """Named target: every MIL output of the default target, and every mil.deploy model's calls."""
    input:
        mil_outputs,
        mil_deploy_outputs,
