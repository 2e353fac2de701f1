"""Training configuration: dataclass sections, TOML files and ``--section.key=value`` overrides.

Precedence: dataclass defaults < TOML file < command-line overrides. An override's value is
read as a TOML literal when it is one (``3``, ``1e-3``, ``true``, ``[[256, 32, 100]]``,
``"text"``) and as a bare string otherwise (``--parallel.layout=zigzag``), then checked
against the field's type. Unknown sections or keys are errors that list the valid names.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ringattn.model.config import ModelConfig, get_preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ModelSection",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "resolve_config",
    "shipped_configs",
]


@dataclass
class ModelSection:
    """A model preset (``ringattn.model.PRESETS``) plus optional field overrides."""

    preset: str = "tiny"
    vocab_size: int | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    ffn_chunk: int | None = None  # blockwise FFN chunk in tokens (per rank)
    rope_theta: float | None = None
    tie_embeddings: bool | None = None

    def build(self) -> ModelConfig:
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw.pop("preset")
        return get_preset(self.preset).with_(**{k: v for k, v in kw.items() if v is not None})


@dataclass
class ParallelConfig:
    dp: int = 1
    cp: int = 1
    tp: int = 1
    layout: str = "zigzag"  # contiguous | zigzag | striped | packed (balanced per document)
    strategy: str = "ring"  # ring | allgather | ulysses | hybrid
    ulysses: int = 1  # hybrid: Ulysses degree inside cp (cp = ring x ulysses)
    kernel: str = "auto"  # local attention kernel of the ring
    grad_precision: str = "auto"  # half backward: exact | fast | auto (fast on CUDA only)
    sequence_parallel: bool = True  # with tp > 1: norms/residuals sharded over tp too
    ac: str = "none"  # activation checkpointing: full | none
    device: str = "auto"  # auto | cpu | cuda
    threads_per_rank: int = 1  # CPU: intra-op threads of each local rank


@dataclass
class DataConfig:
    kind: str = "retrieval"  # retrieval | text | tokens
    seq_len: int = 1024  # global tokens per sequence (after the curriculum)
    batch_size: int = 8  # global sequences per step
    # Stages run first, in order: [seq_len, batch_size, steps] each.
    curriculum: list[list[int]] = field(default_factory=list)
    seed: int = 1234
    # retrieval task (ringattn.train.data.RetrievalTask)
    needle: str = "token"  # token: one (key, value) token; pair: NEEDLE key value (induction)
    n_pairs: int = 8  # needles per sequence, each queried once at the end
    n_keys: int = 8
    n_values: int = 16  # chance accuracy = 1 / n_values
    n_filler: int = 96
    # text: files or folders of text, bytes as tokens, documents packed into sequences;
    # tokens: [the folder `ringattn prepare` wrote], its documents packed the same way
    paths: list[str] = field(default_factory=list)
    cross_doc_attention: bool = False  # true: plain packing, no cu_seqlens masking
    val_fraction: float = 0.05


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global L2 norm; <= 0 disables


@dataclass
class TrainConfig:
    steps: int = 100
    dtype: str = "fp32"  # fp32 | bf16 (compute; master weights and optimizer stay fp32)
    seed: int = 0  # model init
    log_every: int = 10
    out_dir: str = "runs/default"
    peak_tflops: float = 0.3  # per rank, for MFU; CPU fp32 ~0.3 per core, H100 bf16 ~989
    progress: bool = True
    plot: bool = True


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" -> <out_dir>/checkpoints
    every: int = 0  # steps between checkpoints; 0 -> only at the end if enabled
    enabled: bool = False
    resume: bool = True  # continue from the newest complete checkpoint in dir
    keep: int = 2


@dataclass
class EvalConfig:
    every: int = 0  # steps between evals; 0 -> only at the end
    n_seqs: int = 64  # the final evaluation
    periodic_n_seqs: int = 0  # the evals every `every` steps; 0 -> n_seqs
    seq_len: int = 0  # 0 -> data.seq_len
    batch_size: int = 1  # global sequences per eval forward
    seed: int = 999_983


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        cfg = cls()
        apply_dict(cfg, d, where="config")
        return cfg


# ----------------------------------------------------------------------------- coercion


def _coerce(value, tp, where: str):
    """``value`` checked/converted to the annotated type ``tp`` (int, float, bool, str,
    ``X | None``, ``list[X]``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [] if not value else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    raise TypeError(f"{where}: unsupported field type {tp}")


def _set(obj, key: str, value, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        valid = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ValueError(f"{where}: unknown key {key!r}; valid keys: {valid}")
    setattr(obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def apply_dict(cfg: Config, d: dict, where: str) -> None:
    """Set ``cfg.section.key`` from ``{section: {key: value}}``."""
    sections = {f.name for f in dataclasses.fields(cfg)}
    for name, values in d.items():
        if name not in sections:
            raise ValueError(f"{where}: unknown section [{name}]; valid: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"{where}: [{name}] must be a table of key = value")
        for key, value in values.items():
            _set(getattr(cfg, name), key, value, f"{where}: {name}")


def _literal(raw: str):
    """A TOML literal if ``raw`` is one, else the string itself (no eval, no exec)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(args: list[str]) -> dict:
    """``["--data.seq_len=8192", "--parallel.cp", "4"]`` -> ``{"data": {"seq_len": 8192},
    "parallel": {"cp": 4}}``."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ValueError(f"override {arg!r} is not of the form --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = arg[2:], args[i + 1]
            i += 1
        else:
            raise ValueError(f"override {arg!r} has no value")
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = _literal(raw)
        i += 1
    return out


def shipped_configs() -> dict:
    """The configs shipped with the package (``ringattn/configs/*.toml``; the repository's
    ``configs/`` points at the same folder): ``{name: file}``, e.g. ``"demo"``."""
    from importlib.resources import files

    folder = files("ringattn") / "configs"
    return {f.name[: -len(".toml")]: f for f in folder.iterdir() if f.name.endswith(".toml")}


def resolve_config(name: str | Path):
    """A ``--config`` value: a TOML file, or the name of a shipped config (``demo``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(name) in shipped:
        return shipped[str(name)]
    raise ValueError(
        f"--config {name}: no such file; pass a TOML file or one of the shipped configs: "
        f"{', '.join(sorted(shipped))} (e.g. --config demo)"
    )


def load_config(path=None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file at ``path`` (if any; a path or a shipped config's name,
    see :func:`resolve_config`), then the overrides."""
    cfg = Config()
    if path is not None:
        path = resolve_config(path)
        try:
            with path.open("rb") as f:
                table = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
        apply_dict(cfg, table, where=str(path))
    apply_dict(cfg, parse_overrides(overrides or []), where="command line")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that need no process group."""
    from ringattn.kernels import GRAD_PRECISIONS, KERNELS
    from ringattn.layouts import ALL_LAYOUTS
    from ringattn.parallel.ac import AC_MODES
    from ringattn.parallel.cp import STRATEGIES

    choices = [
        ("parallel.layout", cfg.parallel.layout, ALL_LAYOUTS),
        ("parallel.strategy", cfg.parallel.strategy, STRATEGIES),
        ("parallel.kernel", cfg.parallel.kernel, KERNELS),
        ("parallel.grad_precision", cfg.parallel.grad_precision, GRAD_PRECISIONS),
        ("parallel.ac", cfg.parallel.ac, AC_MODES),
        ("parallel.device", cfg.parallel.device, ("auto", "cpu", "cuda")),
        ("data.kind", cfg.data.kind, ("retrieval", "text", "tokens")),
        ("data.needle", cfg.data.needle, ("token", "pair")),
        ("train.dtype", cfg.train.dtype, ("fp32", "bf16")),
    ]
    for name, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is unknown; choose one of {list(allowed)}")
    for stage in cfg.data.curriculum:
        if len(stage) != 3 or min(stage) < 1:
            raise ValueError(
                f"data.curriculum stage {stage} must be [seq_len, batch_size, steps], all >= 1"
            )
    if cfg.data.kind == "text" and not cfg.data.paths:
        raise ValueError("data.kind='text' needs data.paths (files or folders of text)")
    try:
        cfg.model.build()
    except ValueError as e:  # an unknown preset
        raise ValueError(f"model.preset={cfg.model.preset!r}: {e}") from None
    if cfg.data.kind == "tokens":  # reads the manifest only
        from ringattn.train.tokens import check_token_dataset

        check_token_dataset(cfg.data.paths, cfg.model.build().vocab_size)

    from ringattn.train.checks import check_config

    check_config(cfg)  # sizes, divisibility, heads, batches: everything but the world size
