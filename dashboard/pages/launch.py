"""Launch: a training job from a form, validated by the config schema, sent to the Jobs API.

Every field takes its bounds, starting value, help text and choices from the config schema
(`lmforge.launch_form.form_field`); only labels and layout live here, but for the settings of
an architecture's own, which its file labels (`launch_form.arch_fields`).
"""

import streamlit as st
import ui

from lmforge import jobspec, launch_form, models, paths
from lmforge.data.dataset import Dataset
from lmforge.estimate import estimate, human_bytes

st.title("Launch a training job")
presets = launch_form.presets()
source = st.session_state.get("launch_from")  # (mode, uri), set by the Models page


def clear_fields() -> None:
    """A new base (preset or version): the fields take its values again."""
    for k in [k for k in st.session_state if str(k).startswith("f_") and k != "f_preset"]:
        del st.session_state[k]


if source:
    mode, uri = source
    with ui.guard(f"Cannot start from {uri}"):
        base = ui.version_config(uri)
    if mode == "init":  # a new run: not the source's name
        base = {**base, "run": {**base.get("run", {}), "name": None}}
    st.info(
        f"{'Resuming' if mode == 'resume' else 'Fine-tuning from'} `{uri}`: "
        + (
            "the job continues the run that registered it (same model, data and ZeRO stage); "
            "raise Steps to train further."
            if mode == "resume"
            else "a new run starts from its weights; the model shape comes from the checkpoint."
        )
    )
    if st.button("Start from a preset instead"):
        del st.session_state["launch_from"]
        clear_fields()
        st.rerun()
else:
    names = list(presets)
    preset = st.selectbox(
        "Preset",
        names,
        index=names.index("tiny") if "tiny" in names else 0,
        key="f_preset",
        on_change=clear_fields,
        help="A config from jobs/configs/; the fields below start from it.",
    )
    base = launch_form.preset_config(presets[preset])

base_cfg, _ = launch_form.form_config(base, {})
defaults = base_cfg.to_dict() if base_cfg else {}
datasets = [str(p) for p in launch_form.known_datasets()]
if not datasets:
    roots = ", ".join(str(r) for r in jobspec.data_roots())
    st.info(
        f"No prepared dataset in the data roots ({roots}). Prepare one with "
        "`lmforge prepare --output ~/.lmforge/datasets/NAME`, or upload a corpus below."
    )

fields: dict[str, object] = {}
slots: dict[str, object] = {}


def start(key: str, f: launch_form.FormField | None = None):
    """The value a field starts from: the base config's, else the schema's default."""
    value = defaults
    for part in key.split("."):  # train.lr, train.dpo.beta
        value = value.get(part) if isinstance(value, dict) else None
    return (f or launch_form.form_field(key)).default if value is None else value


def field(key: str, widget, label: str, *args, **kwargs):
    """A widget whose value goes to config key `key`, with a slot below it for its error.
    Its help text is the config field's description."""
    if "help" not in kwargs:
        kwargs["help"] = launch_form.form_field(key).help
    fields[key] = widget(label, *args, key=f"f_{key}", **kwargs)
    slots[key] = st.empty()


def number(key: str, label: str, **kwargs):
    """A number input bounded as the schema bounds `key`."""
    f = launch_form.form_field(key)
    value = f.type(start(key))
    field(key, st.number_input, label, min_value=f.min, max_value=f.max, value=value, **kwargs)


def setting(key: str, f: launch_form.FormField):
    """A widget for a setting of the architecture's own: a toggle, or a number input that may
    stay empty (unset: the architecture's default)."""
    value, label = start(key, f), f.label or key
    if f.type is bool:
        field(key, st.toggle, label, value=bool(value), help=f.help)
        return
    value = None if value is None else f.type(value)
    field(key, st.number_input, label, min_value=f.min, max_value=f.max, value=value,
          format="%g" if f.type is float else None, placeholder="the architecture's default",
          help=f.help)  # fmt: skip


def choice(key: str, label: str):
    """A select box of the values the schema allows for `key` (a Literal, or an int range)."""
    f = launch_form.form_field(key)
    options = list(f.choices or range(f.min, f.max + 1))
    field(key, st.selectbox, label, options, index=options.index(start(key)))


left, mid, right = st.columns(3)
with left:
    st.subheader("Model")
    choice("model.arch", "Architecture")
    arch = models.settings(fields["model.arch"])  # its file's `Settings`: the keys it reads
    number("model.n_layer", "Layers")
    if "n_head" not in arch.unused:  # e.g. a recurrent model has no heads
        number("model.n_head", "Heads")
    number("model.d_model", "Width (d_model)")
    number("model.context_length", "Context")
    for key, f in launch_form.arch_fields(fields["model.arch"]).items():
        setting(key, f)
    # Another architecture's settings in the base (a preset, a version) do not carry over.
    base = {**base, "model": {k: v for k, v in base.get("model", {}).items()
                              if k in arch.model_fields}}  # fmt: skip
    st.subheader("Data")
    data_default = str(paths.resolve(start("data.path")))
    if st.session_state.get("f_data.path") not in datasets:  # new or vanished datasets
        st.session_state.pop("f_data.path", None)
    field(
        "data.path",
        st.selectbox,
        "Dataset",
        datasets,
        index=datasets.index(data_default) if data_default in datasets else 0 if datasets else None,
        help=launch_form.form_field("data.path").help
        + " Listed: the prepared datasets inside the data roots (LMFORGE_DATA_ROOTS).",
    )
    mixed = st.multiselect(
        "Mix with (a mixture by token weight)", datasets, key="mix_sources",
        help="Two or more datasets prepared with the same tokenizer, mixed into one stream: "
        "each gives its weight's share of every step's tokens (the Dataset above is unused).",
    )  # fmt: skip
    if len(mixed) >= 2:
        fields["data.sources"] = [
            {"path": p, "name": launch_form.source_name(p, mixed), "weight": st.number_input(
                f"Weight of {launch_form.source_name(p, mixed)}", min_value=0.0,
                value=1.0, step=0.1, key=f"mix_weight_{p}")}
            for p in mixed
        ]  # fmt: skip
        slots["data.sources"] = st.empty()
with mid:
    st.subheader("Training")
    number("train.max_steps", "Steps")
    number("train.micro_batch_size", "Micro-batch per worker")
    number("train.grad_accum_steps", "Gradient accumulation")
    number("train.lr", "Learning rate", format="%.2e", step=1e-4)
    number("train.min_lr", "Final learning rate", format="%.2e", step=1e-5)
    number("train.warmup_steps", "Warm-up steps")
    choice("train.precision", "Precision")
    number("train.eval_every", "Evaluate every (steps)")
    number("train.checkpoint_every", "Checkpoint every (steps)")
    # Preference tuning (lmforge.preference): on a `prepare --format preference` dataset,
    # from a version (Start from: a version), which is also the reference.
    choice("train.objective", "Objective (lm, or dpo on preference pairs)")
    if fields["train.objective"] == "dpo":
        choice("train.dpo.loss", "Preference loss")
        number("train.dpo.beta", "Beta", format="%.3f", step=0.05)
        if fields["train.dpo.loss"] == "simpo":
            number("train.dpo.gamma", "SimPO gamma", format="%.2f", step=0.1)
with right:
    st.subheader("Distribution")
    choice("zero.stage", "ZeRO stage")
    choice("zero.offload_optimizer", "Offload optimizer")
    choice("zero.offload_params", "Offload parameters (ZeRO 3)")
    # num_workers: N, or [N, at most] (elastic) when "at most" is above N.
    lo, hi = (lambda n: n if isinstance(n, list | tuple) else (n, n))(start("scaling.num_workers"))
    w1, w2 = st.columns(2)
    least = w1.number_input("Workers", min_value=1, value=int(lo), key="workers_min",
                            help=launch_form.form_field("scaling.num_workers").help)  # fmt: skip
    most = w2.number_input("Elastic: at most", min_value=1, value=int(hi), key="workers_max",
                           help="Above Workers: elastic, from Workers up to this many")  # fmt: skip
    fields["scaling.num_workers"] = least if most <= least else [least, most]
    slots["scaling.num_workers"] = st.empty()
    field("scaling.use_gpu", st.toggle, "One GPU per worker", value=start("scaling.use_gpu"))
    number("scaling.cpus_per_worker", "CPUs per worker", step=0.5)
    st.subheader("Tracking")
    field("tracking.experiment", st.text_input, "Experiment", value=start("tracking.experiment"))
    field("run.name", st.text_input, "Run name (optional)", "", placeholder="generated when empty")

values = {k: v for k, v in fields.items() if v not in ("", None)}
if source and source[0] == "resume":
    values.pop("run.name", None)  # the resumed run keeps its name
cfg, errors = launch_form.form_config(base, values)
if (
    cfg is not None
    and cfg.train.objective == "dpo"
    and not (source and source[0] in ("init", "resume"))
):
    # What the job would refuse before Ray starts (lmforge.preference), said before Submit.
    errors["train.objective"] = (
        "dpo starts from a version, which is also its reference: open one on the Models page "
        "and press Fine-tune"
    )
    cfg = None
for key, msg in errors.items():
    slots.get(key, st).error(f"`{key}`: {msg}")

if cfg is not None:
    vocab = None
    if values.get("data.path"):
        with ui.guard("Dataset"):
            vocab = Dataset(cfg.data.paths[0]).vocab_size
    est = estimate(cfg, vocab_size=vocab or 8192)
    mem = est.per_worker_bytes
    st.subheader("Estimate")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Parameters", f"{est.n_params / 1e6:,.2f} M")
    c2.metric("Tokens per step", f"{est.tokens_per_step:,}")
    c3.metric(f"Memory per worker, ZeRO {cfg.zero.stage}", human_bytes(mem["total"]))
    c4.metric("Offloaded to host, per worker", human_bytes(est.offloaded_bytes))
    st.caption(
        " | ".join(
            f"{k.replace('_', ' ')} {human_bytes(v)}" for k, v in mem.items() if k != "total"
        )
        + ("" if vocab else " (vocab 8192 assumed until a dataset is chosen)")
        + f" | {est.flops_per_step / 1e12:,.3g} TFLOP per step | activations are approximate"
    )
    if cfg.data.sources:
        with ui.guard("Mixture"):
            st.caption(launch_form.mixture_line(cfg, est.tokens_per_step))

if st.button("Submit job", type="primary", disabled=cfg is None or not datasets):
    mode, uri = source or (None, None)
    with ui.guard("Not submitted"):
        spec = jobspec.train_job(
            cfg,
            tracking_uri=ui.tracking_uri(),
            resume=uri if mode == "resume" else None,
            init_from=uri if mode == "init" else None,
        )
        sid = ui.job_client().submit(spec)
    st.session_state["jobs_selected"] = sid
    st.success(f"Submitted job `{sid}` (run {spec.metadata['lmforge.run_name']})")
    st.code(spec.entrypoint, language="bash", wrap_lines=True)
    st.page_link("pages/jobs.py", label="Watch it on the Jobs page", icon=":material/list_alt:")

with st.expander("Sweep this config: many jobs with values drawn from a space"):
    st.caption(
        "Each trial is a whole job of this form's config with the space's values on top; "
        "ASHA stops the worst early; the best checkpoint is registered as "
        "`models:/MODEL@sweep-NAME` (`lmforge sweep`, run as a Ray job). Every value the "
        "space can produce is checked before anything is submitted."
    )
    sweep_name = st.text_input("Sweep name", placeholder="lr-1", key="sweep_name")
    space_text = st.text_area(
        "Space (YAML: config key -> {loguniform|uniform|randint|choice|grid: [...]})",
        "train.lr: {loguniform: [3.0e-4, 3.0e-3]}\n", key="sweep_space",
    )  # fmt: skip
    s1, s2, s3, s4 = st.columns(4)
    sweep_trials = s1.number_input("Trials", 1, 256, 8, key="sweep_trials")
    sweep_conc = s2.number_input("At once", 1, 64, 2, key="sweep_conc")
    sweep_sched = s3.selectbox("Scheduler", ["asha", "none"], key="sweep_sched")
    sweep_search = s4.selectbox("Search", ["random", "optuna"], key="sweep_search")
    if st.button("Submit sweep", disabled=cfg is None or not sweep_name.strip(), key="sweep_go"):
        import yaml

        from lmforge.sweeps import plan as sweeps  # the checks only: no Ray, no DeepSpeed
        from lmforge.sweeps.submit import sweep_job

        with ui.guard("Not submitted"):
            opts = sweeps.SweepOptions(
                trials=int(sweep_trials), max_concurrent=int(sweep_conc),
                scheduler=sweep_sched, search=sweep_search,
            )  # fmt: skip
            try:
                space_raw = yaml.safe_load(space_text)
            except yaml.YAMLError as err:
                raise jobspec.JobSpecError(f"space: not valid YAML ({err})") from None
            plan = sweeps.plan_sweep(sweep_name.strip(), cfg.to_dict(), space_raw, [], opts)
            spec = sweep_job(plan.name, cfg, plan.space, opts, ui.tracking_uri())
            sid = ui.job_client().submit(spec)
        st.session_state["jobs_selected"] = sid
        st.success(f"Submitted sweep `{plan.name}` as job `{sid}`")
        st.page_link(
            "pages/sweeps.py", label="Its trials on the Sweeps page", icon=":material/tune:"
        )

st.divider()
with st.expander("Upload a small text corpus and prepare a dataset from it"):
    kind = st.radio(
        "Format",
        ["Text", "Instruction rows (SFT)", "Preference pairs (DPO)"],
        horizontal=True,
        help="Text: documents, packed into rows, every token a target. Instruction rows: "
        '.jsonl of {"prompt", "completion"} or {"messages": [...]}, rendered with a '
        "template; only the completions are targets, one example a row. Preference pairs: "
        '.jsonl of {"prompt", "chosen", "rejected"} for train.objective dpo.',
    )
    sft = kind != "Text"
    data_format = {"Text": "text", "Preference pairs (DPO)": "preference"}.get(kind, "sft")
    files = st.file_uploader(
        '.jsonl rows ({"prompt", "chosen", "rejected"} a line)'
        if data_format == "preference"
        else '.jsonl rows ({"prompt", "completion"} or {"messages": [...]} a line)'
        if sft
        else "Text files (.txt, one document each) or .jsonl (a `text` field per line)",
        type=["jsonl"] if sft else ["txt", "jsonl"],
        accept_multiple_files=True,
    )
    name = st.text_input("Dataset name", placeholder="my-corpus")
    vocab_size = st.number_input("Vocabulary size", 257, 65536, 2048)
    if sft:
        template = st.selectbox(
            "Template", jobspec.DASHBOARD_TEMPLATES,
            help="How a row becomes text; it travels with the dataset into the checkpoints "
            "and the Playground. A .jinja file or few-shot examples: `lmforge prepare`.",
        )  # fmt: skip
        seq_tokens = st.number_input("Longest example (tokens)", 2, 8192, 256)
        policy = st.radio(
            "A longer row", ["drop", "cut-prompt"], horizontal=True,
            help="drop it, or cut its prompt's first tokens (dropped if its completion alone "
            "is too long)",
        )  # fmt: skip
    else:
        template, policy = None, "drop"
        seq_tokens = st.number_input("Tokens per packed row", 2, 8192, 256)
    if st.button("Prepare dataset", disabled=not files or not name):
        with ui.guard("Not prepared"):
            corpus, out = launch_form.save_upload(name, [(f.name, f.getvalue()) for f in files])
            spec = jobspec.prepare_job(
                [corpus], out, vocab_size=vocab_size, seq_tokens=seq_tokens, rows_per_group=4,
                data_format=data_format, template=template, prompt_policy=policy,
            )  # fmt: skip
            sid = ui.job_client().submit(spec)
        st.session_state["jobs_selected"] = sid
        size = sum(len(f.getvalue()) for f in files)
        st.success(f"Submitted prepare job `{sid}`: {size:,} bytes -> `{out}`")
