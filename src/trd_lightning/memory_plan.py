"""The memory plan: what a run needs on each device, from the models' ``config.json`` and the run's settings, before
any weight loads (so it also runs on a laptop before the weights are downloaded).

Each term is per device. Exact terms come from the libraries: parameters are counted on a model transformers builds
on the meta device (and peft adapts there: LoRA's trainable count), and an engine's KV cache costs what vLLM sizes it
at, 2 (K and V) x layers x KV heads x head dim x dtype bytes a token. Estimates are marked: activations (what a
forward keeps for the backward, at the micro-batch token budget) and the fused divergence's chunk. A step has two
phases, and the peak is the larger: generating (the engines awake beside the trainer's resident models) and training
(the engines asleep when ``sleep`` is on, activations and gradients added).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trd_lightning.precision import compute_dtype

GIB = 2**30
ADAMW_STATE = 8  # exp_avg and exp_avg_sq, float32
FLOAT32 = 4
RUNTIME = 3 * GIB  # CUDA context, NCCL buffers, allocator slack: an estimate, not computed
ENGINE_STEP_TOKENS = 8192  # vLLM's default tokens per engine step on GPUs, which sizes its activation workspace


class PlanError(ValueError):
    """The run does not fit its devices; the message names the largest term and what would make it fit."""


def dtype_bytes(dtype: str | torch.dtype) -> int:
    return (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize


def model_config(spec) -> dict:
    """A model's ``config.json`` as a dict: from its folder when there, else from ``plan_config`` (the architecture facts,
    e.g. ``configs/models/Qwen3-8B.json``), or the spec's own ``config``."""
    from trd_lightning.models import resolve_path

    if spec.config is not None:
        return dict(spec.config)
    if spec.gguf_file:  # the architecture is in the GGUF file's header
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolve_path(spec.path), gguf_file=spec.gguf_file).to_dict()
    candidates = []
    if spec.path:
        try:
            candidates.append(resolve_path(spec.path) / "config.json")
        except FileNotFoundError:
            pass
    if getattr(spec, "plan_config", None):
        candidates.append(Path(spec.plan_config).expanduser())
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"the memory plan needs {spec.name}'s config.json: its folder is not there and the model names no "
                            "`plan_config` (a config.json of the same architecture, e.g. configs/models/Qwen3-8B.json)")


@dataclass
class Shape:
    """What the plan needs of one model: counted on the meta device, no weights."""

    parameters: int
    trainable: int  # LoRA adapters, or every parameter
    hidden: int
    intermediate: int
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config: dict, lora=None) -> Shape:
        key = None if lora is None else (lora.r, lora.alpha, lora.dropout, json.dumps(lora.target_modules))
        return _shape(json.dumps(config, sort_keys=True), key)

    @classmethod
    def build(cls, config: dict, lora=None) -> Shape:
        from transformers import AutoConfig, AutoModelForCausalLM

        values = dict(config)
        values.pop("architectures", None)
        hf = AutoConfig.for_model(values.pop("model_type"), **{k: v for k, v in values.items() if k != "transformers_version"})
        text = hf.get_text_config()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
        parameters = sum(p.numel() for p in model.parameters())
        trainable = parameters
        if lora is not None:
            from trd_lightning.models import apply_lora

            adapted = apply_lora(model, lora)
            trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(parameters, trainable, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
                   getattr(text, "num_key_value_heads", None) or text.num_attention_heads, head_dim, text.vocab_size)

    def kv_bytes_per_token(self, dtype: str) -> int:
        """vLLM's KV cache per token: K and V, every layer, every KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes(dtype)

    def activation_bytes(self, tokens: int, compute: str, checkpointing: bool, trained: bool) -> int:
        """What a forward over ``tokens`` keeps for the backward (an estimate). A decoder layer keeps about 16 hidden-wide
        and 3 intermediate-wide tensors a token (norms, q/k/v/o, residuals; gate, up, their product); with gradient
        checkpointing only each layer's input is kept, plus one layer recomputed. A forward without grad (the
        teacher's) holds about one layer's worth at a time."""
        size = dtype_bytes(compute)
        layer = tokens * (16 * self.hidden + 3 * self.intermediate) * size
        if not trained:
            return layer
        if checkpointing:
            return self.layers * tokens * self.hidden * size + layer
        return self.layers * layer


@functools.lru_cache(maxsize=16)
def _shape(config: str, lora_key: tuple | None) -> Shape:  # a plan is built many times (the budget search)
    from trd_lightning.models import LoRA

    lora = None if lora_key is None else LoRA(*lora_key[:3], target_modules=json.loads(lora_key[3]))
    return Shape.build(json.loads(config), lora)


@dataclass
class Term:
    name: str
    bytes: int
    estimate: bool = False
    phases: tuple[str, ...] = ("generate", "train")
    note: str = ""


@dataclass
class MemoryPlan:
    device_bytes: int
    terms: list[Term] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def phase(self, name: str) -> int:
        return sum(t.bytes for t in self.terms if name in t.phases)

    @property
    def peak(self) -> int:
        return max(self.phase("generate"), self.phase("train"))

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_bytes

    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    def table(self) -> str:
        width = max(len(t.name) for t in self.terms)
        lines = [f"{'term (per device)':<{width}}  {'GiB':>8}  {'phase':<15} note"]
        for t in self.terms:
            phases = "both" if len(t.phases) == 2 else t.phases[0]
            note = "; ".join(part for part in ("estimate" if t.estimate else "", t.note) if part)
            lines.append(f"{t.name:<{width}}  {t.bytes / GIB:>8.2f}  {phases:<15} {note}")
        lines.append(f"{'generating (engines awake)':<{width}}  {self.phase('generate') / GIB:>8.2f}")
        lines.append(f"{'training':<{width}}  {self.phase('train') / GIB:>8.2f}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"{'peak, against the device':<{width}}  {self.peak / GIB:>8.2f}  of {self.device_bytes / GIB:.1f} GiB: {verdict}")
        return "\n".join(lines + [f"- {n}" for n in self.notes])


@dataclass
class RunShape:
    """The run's settings the plan reads (from a config, or from a module and its trainer)."""

    student: object  # ModelSpec
    teacher: object | None  # the teacher's ModelSpec when it has its own weights in the trainer, else None
    teacher_engine: bool  # whether a teacher's engine runs in the trainer's process
    precision: str = "bf16-mixed"
    world_size: int = 1
    fsdp: bool = False
    max_tokens_per_micro_batch: int | None = None
    chunk_size: int = 256
    engine: object | None = None  # a VLLMEngine, or None for the HF engine (generation on the live module)
    device_bytes: int = 80 * 10**9


def build_plan(run: RunShape, budget: int | None = None) -> MemoryPlan:
    """Every term of ``run`` on one device (``budget``: the micro-batch tokens to plan for, default the run's)."""
    student = run.student
    shape = Shape.of(model_config(student), student.lora)
    shard = run.world_size if run.fsdp else 1
    compute = compute_dtype(run.precision, student.dtype)
    plan = MemoryPlan(run.device_bytes)
    weight = dtype_bytes(student.dtype)
    trains_all = student.lora is None
    plan.terms.append(Term("student weights", shape.parameters * weight // shard, note=f"{shape.parameters / 1e9:.2f}B parameters in {student.dtype}"
                           + (f", sharded over {shard}" if shard > 1 else "")))
    trainable = shape.trainable if not trains_all else shape.parameters
    state = trainable * ADAMW_STATE + (0 if trains_all else trainable * FLOAT32)  # LoRA: the float32 adapters themselves too
    plan.terms.append(Term("trainable: AdamW state" + ("" if trains_all else " and the float32 adapters"), state // shard,
                           note=f"{trainable / 1e6:.1f}M trainable parameters"))
    teacher_shape = None
    if run.teacher is not None:
        teacher_shape = Shape.of(model_config(run.teacher))
        plan.terms.append(Term("teacher weights", teacher_shape.parameters * dtype_bytes(run.teacher.dtype) // shard,
                               note=f"{teacher_shape.parameters / 1e9:.2f}B parameters in {run.teacher.dtype}"))
    tokens = budget or run.max_tokens_per_micro_batch
    gradients = trainable * FLOAT32 // shard
    if tokens:
        # The backward frees activations as it fills the gradients: the peak holds about the larger of the two.
        activations = shape.activation_bytes(tokens, compute, student.gradient_checkpointing, True)
        plan.terms.append(Term("student activations or float32 gradients, the larger", max(activations, gradients), estimate=True,
                               phases=("train",), note=f"{tokens:,} tokens a micro-batch, gradient checkpointing "
                               f"{'on' if student.gradient_checkpointing else 'off'}: {activations / GIB:.2f} GiB; "
                               f"gradients {gradients / GIB:.2f} GiB"))
        if teacher_shape is not None:  # runs before the student's forward: its transient adds only where it is larger
            kept = tokens * teacher_shape.hidden * dtype_bytes(compute)  # its last hidden states, read by the divergence
            beyond = max(0, teacher_shape.activation_bytes(tokens, compute, False, False) - max(activations, gradients))
            plan.terms.append(Term("teacher forward (no grad): kept hidden states, and its transient beyond the student's",
                                   kept + beyond, estimate=True, phases=("train",)))
    else:
        plan.terms.append(Term("float32 gradients", gradients, phases=("train",)))
        plan.notes.append("no max_tokens_per_micro_batch: the whole step is one micro-batch, so activations are not planned")
    plan.terms.append(Term("fused divergence chunk", 3 * run.chunk_size * shape.vocab * FLOAT32, estimate=True, phases=("train",),
                           note=f"{run.chunk_size} positions x {shape.vocab:,} logits, float32, both models and the gradient"))
    if run.engine is not None:
        roles = [("student", student, shape)]
        if run.teacher_engine:
            teacher_spec = run.teacher or student
            roles.append(("teacher", teacher_spec, teacher_shape or shape))
        asleep = ("generate",) if run.engine.sleep else ("generate", "train")
        for role, spec, role_shape in roles:
            memory = run.engine.memory(role)
            engine_dtype = compute if run.engine.dtype == "auto" else run.engine.dtype
            weights = role_shape.parameters * dtype_bytes(engine_dtype)
            if memory.kv_cache_memory_bytes is not None:
                kv = memory.kv_cache_memory_bytes
                where = "kv_cache_memory_bytes"
            else:
                kv = max(0, int(memory.gpu_memory_utilization * run.device_bytes) - weights)
                where = f"gpu_memory_utilization {memory.gpu_memory_utilization} of the device, less its weights"
            per_token = role_shape.kv_bytes_per_token(engine_dtype)
            longest = memory.max_model_len or model_config(spec).get("max_position_embeddings", 0)
            fit = kv / (per_token * longest) if longest else float("nan")
            plan.terms.append(Term(f"{role} engine weights", weights, phases=asleep, note=f"in {engine_dtype}"))
            plan.terms.append(Term(f"{role} engine activations and CUDA graphs", role_shape.activation_bytes(
                ENGINE_STEP_TOKENS, engine_dtype, False, False), estimate=True, phases=("generate",),
                note=f"one engine step of {ENGINE_STEP_TOKENS:,} tokens"))
            plan.terms.append(Term(f"{role} engine KV cache", kv, phases=asleep,
                                   note=f"{where}: {kv // per_token:,} tokens at {per_token:,} bytes; {fit:.1f} sequences of {longest:,}"))
            if fit < 1:
                plan.notes.append(f"the {role} engine's KV cache holds less than one sequence of max_model_len {longest:,}: vLLM refuses to start")
    if run.device_bytes >= 8 * GIB:  # a GPU's; a CPU run's plan leaves the runtime out
        plan.terms.append(Term("CUDA context, NCCL, allocator slack", RUNTIME, estimate=True))
    return plan


def largest_budget_that_fits(run: RunShape) -> int | None:
    """The largest micro-batch token budget (a multiple of 1,024) whose plan fits, or None when none does."""
    low, high = 0, 1 << 20
    while high - low > 1024:
        middle = (low + high) // 2 // 1024 * 1024
        if build_plan(run, middle).fits:
            low = middle
        else:
            high = middle
    return low or None


def check_fits(run: RunShape) -> MemoryPlan:
    """Refuse a run whose plan does not fit its device, naming the largest term and what would make it fit."""
    plan = build_plan(run)
    if plan.fits:
        return plan
    largest = plan.largest()
    budget = largest_budget_that_fits(run) if run.max_tokens_per_micro_batch else None
    advice = f"; max_tokens_per_micro_batch: {budget} fits" if budget else ""
    raise PlanError(f"the run needs {plan.peak / GIB:.1f} GiB per device, more than its {run.device_bytes / GIB:.1f} GiB; the largest term "
                    f"is {largest.name} ({largest.bytes / GIB:.1f} GiB){advice} (or shard with configs/strategy/fsdp.yaml, "
                    "shrink an engine's KV cache, or turn on gradient checkpointing). `trd plan --config ...` shows every term")


# -- the run's settings, from a parsed config (``trd plan``) or from a module and its trainer (``trd fit``) -------------
def model_spec(values) -> object:
    from trd_lightning.models import LoRA, ModelSpec

    values = dict(values)
    if values.get("lora"):
        values["lora"] = LoRA(**dict(values["lora"]))
    return ModelSpec(**values)


def teacher_roles(teacher_class: str, teacher_args, student) -> tuple[object | None, bool]:
    """(the teacher's own weights in the trainer, if any, as a ModelSpec; whether a teacher's engine runs here)."""
    name = teacher_class.rsplit(".", 1)[-1]
    if name == "SeparateTeacher":
        return model_spec(teacher_args["model"]), True
    if name == "SelfTeacher":
        frozen = teacher_args.get("frozen", True)
        copy = student if frozen and student.lora is None else None  # a frozen full copy; LoRA's is the base, shared
        return copy, frozen
    return None, False  # a served teacher: its memory is on its own machines


def run_shape_from_config(config, device_bytes: int) -> RunShape:
    """The plan's view of a parsed ``trd fit`` config (a jsonargparse namespace), with nothing instantiated."""
    from trd_lightning.rollout.vllm import EngineMemory, VLLMEngine

    model = config.model.init_args.as_dict() if hasattr(config.model.init_args, "as_dict") else dict(config.model.init_args)
    student = model_spec(model["student"])
    teacher = model.get("teacher") or {}
    own, teacher_engine = teacher_roles(teacher.get("class_path", ""), teacher.get("init_args") or {}, student)
    teacher_engine = teacher_engine and "Rewrite" in (model.get("refiner") or {}).get("class_path", "")  # rewrites in fit
    engine_config = model.get("engine") or {}
    engine = None
    if engine_config.get("class_path", "").endswith("VLLMEngine"):
        args = dict(engine_config.get("init_args") or {})
        engine = VLLMEngine(student=EngineMemory(**(args.get("student") or {})), teacher=EngineMemory(**(args.get("teacher") or {})),
                            dtype=args.get("dtype", "auto"), sleep=args.get("sleep", False))
    trainer = config.trainer
    strategy = trainer.strategy
    strategy_name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "")
    devices = trainer.devices if isinstance(trainer.devices, int) else len(trainer.devices or [1])
    divergence = (model.get("divergence") or {}).get("init_args") or {}
    sharded = "FSDP2" in str(strategy_name) or "ModelParallel" in str(strategy_name)
    return RunShape(student=student, teacher=own, teacher_engine=teacher_engine and engine is not None, precision=str(trainer.precision),
                    world_size=max(1, devices) * (trainer.num_nodes or 1), fsdp=sharded,
                    max_tokens_per_micro_batch=model.get("max_tokens_per_micro_batch"), chunk_size=divergence.get("chunk_size", 256),
                    engine=engine, device_bytes=device_bytes)
