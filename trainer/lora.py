"""Low-rank adapters (LoRA) on the UNet and the text encoder, through peft: inject, train, save, load, merge.

Nothing here is a hand-written LoRA layer: adapters are peft's (``LoraConfig`` + ``inject_adapter_in_model``), saved
and loaded with ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``, weighted with peft's per-adapter scale
and merged with peft's own ``merge``. This module adds what the rest of the package needs around them:

- **targets by short name** (:data:`TARGETS`): ``attention`` (the UNet's ``to_q``/``to_k``/``to_v``/``to_out.0``),
  ``ff``, ... or, for anything else, a regular expression matched (``re.fullmatch``) against module names;
- **self-describing adapter files**: safetensors holding the adapter tensors of one or both models under a ``unet.``
  / ``text_encoder.`` prefix, with rank, alpha, dropout and targets of each in the metadata (:func:`save_adapters`,
  :func:`read_adapters`), so loading needs nothing but the file;
- **loading several files with weights** onto a base model at sampling time (:func:`load_adapters`): each file is its
  own peft adapter whose scale is ``weight * alpha / rank``; all are active at once, so their deltas add up;
- **merging** into base weights, either of live modules (:func:`merge_adapters`) or of a state dict read from a file
  (:func:`merge_into_state_dict`, for ``tools/merge_lora.py``, which needs no model config);
- **clear errors** (:class:`~trainer.errors.ConfigError`) naming the file and what to do when an adapter does not fit
  the base model, or a target matches nothing.

The text encoder is an open_clip text tower, whose attention is ``nn.MultiheadAttention``: that module reads
``in_proj_weight`` directly and never calls ``out_proj.forward``, so a LoRA layer put on ``out_proj`` as a Linear would
be silently ignored. Its ``attention`` target therefore uses peft's parameter LoRA (``target_parameters``) on
``attn.in_proj_weight`` (query, key and value; the output projection is not adapted), which adds the low-rank delta
through a parametrization during the forward and leaves the base weight untouched. peft's other route,
``lora.MultiheadAttention`` (in and out projections), merges the adapter into the base weights before each forward
and subtracts it after, which re-creates the base parameters and changes them by float rounding at every call; it is
not used. Parameter LoRA takes no dropout, so text-encoder adapters have none (the text encoder runs in eval mode
anyway). ``mlp`` adapts the tower's ``c_fc`` / ``c_proj`` Linears.

peft is imported lazily (it takes seconds to import): only code that uses LoRA pays for it.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError, MissingFileError

KINDS = ("unet", "text_encoder")
METADATA_KEY = "lora_adapters"  # safetensors metadata: JSON {kind: spec} of the adapters in the file
SUPPORTED_MODULES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Target:
    """What a short target name stands for: a module-name regex (peft ``target_modules``) or parameter names
    (peft ``target_parameters``, matched as a suffix of ``module.parameter``)."""

    modules: str | None = None
    parameters: tuple[str, ...] = ()


# Module names are those of trainer.models.unet.UNetModel and trainer.models.text_encoder.TextEncoder.
TARGETS: dict[str, dict[str, Target]] = {
    "unet": {
        "attention": Target(modules=r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"),
        "self_attention": Target(modules=r".*\.attn1\.(to_q|to_k|to_v|to_out\.0)"),
        "cross_attention": Target(modules=r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)"),
        "ff": Target(modules=r".*\.ff\.net\.(0\.proj|2)"),  # GEGLU projection and the output Linear
        "proj": Target(modules=r".*\.(proj_in|proj_out)"),  # SpatialTransformer in/out: 1x1 convs (SD 1.x) or Linears
    },
    "text_encoder": {
        "attention": Target(parameters=("attn.in_proj_weight",)),  # q, k, v of nn.MultiheadAttention; see above
        "mlp": Target(modules=r"resblocks\.\d+\.mlp\.(c_fc|c_proj)"),
    },
}
DEFAULT_TARGETS = {"unet": ("attention",), "text_encoder": ("attention",)}


@dataclass(frozen=True)
class LoraSpec:
    """Rank, alpha (the adapter's output is scaled by ``alpha / rank``), dropout on the adapter's input, and targets:
    short names of :data:`TARGETS` or module-name regexes."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention",)

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], kind: str, where: str) -> LoraSpec:
        """A spec from a config block (``rank``, ``alpha``, ``dropout``, ``targets``); ``where`` names the block in
        errors. ``alpha`` defaults to ``rank`` (scale 1), targets to :data:`DEFAULT_TARGETS`."""
        allowed = {"rank", "alpha", "dropout", "targets"}
        unknown = set(config) - allowed
        if unknown:
            raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; it takes {sorted(allowed)}")
        rank = config.get("rank", cls.rank)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"{where}.rank must be a positive integer, got {rank!r}")
        alpha = config.get("alpha")
        alpha = float(rank if alpha is None else alpha)
        if alpha <= 0:
            raise ConfigError(f"{where}.alpha must be positive, got {alpha}")
        dropout = float(config.get("dropout") or 0.0)
        if not 0 <= dropout < 1:
            raise ConfigError(f"{where}.dropout must be in [0, 1), got {dropout}")
        targets = config.get("targets") or DEFAULT_TARGETS[kind]
        if isinstance(targets, str):
            targets = [targets]
        targets = tuple(str(target) for target in targets)
        spec = cls(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
        resolve_targets(spec, kind, where)  # unknown names and bad regexes fail here, before any model is built
        if dropout and spec_parameters(spec, kind):
            raise ConfigError(
                f"{where}: dropout={dropout} with the {kind}'s parameter targets (peft's parameter LoRA on "
                f"{list(spec_parameters(spec, kind))}) is not possible; set dropout to 0"
            )
        return spec


def parse_lora_config(config: Mapping[str, Any] | None, where: str = "task.lora") -> dict[str, LoraSpec]:
    """``{kind: spec}`` from the task's ``lora`` block: ``None`` (full fine-tuning) gives ``{}``; the block's own keys
    are the UNet's spec, its ``text_encoder`` key (``None`` or ``{rank, alpha, targets}``) the text encoder's."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where} must be null or a mapping (rank, alpha, dropout, targets, text_encoder)")
    config = dict(config)
    text_encoder = config.pop("text_encoder", None)
    specs = {"unet": LoraSpec.from_config(config, "unet", where)}
    if text_encoder is not None:
        if not isinstance(text_encoder, Mapping):
            raise ConfigError(f"{where}.text_encoder must be null or a mapping (rank, alpha, targets)")
        text_encoder = dict(text_encoder)
        if text_encoder.get("dropout"):
            raise ConfigError(
                f"{where}.text_encoder takes no dropout: the text encoder runs in eval mode, and peft's parameter "
                "LoRA on its attention has none; remove the key"
            )
        specs["text_encoder"] = LoraSpec.from_config(text_encoder, "text_encoder", f"{where}.text_encoder")
    return specs


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown adapter kind {kind!r}; one of {KINDS}")


def resolve_targets(spec: LoraSpec, kind: str, where: str = "lora") -> list[tuple[str, Target]]:
    """Each of the spec's targets with what it stands for; a name that is not a short name is a module regex."""
    _check_kind(kind)
    resolved = []
    for name in spec.targets:
        target = TARGETS[kind].get(name)
        if target is None:
            try:
                re.compile(name)
            except re.error as error:
                raise ConfigError(
                    f"{where}: target {name!r} is neither a short name of the {kind} ({sorted(TARGETS[kind])}) nor "
                    f"a valid regular expression over module names ({error})"
                ) from error
            target = Target(modules=name)
        resolved.append((name, target))
    return resolved


def spec_parameters(spec: LoraSpec, kind: str) -> tuple[str, ...]:
    return tuple(p for _, target in resolve_targets(spec, kind) for p in target.parameters)


def spec_module_regex(spec: LoraSpec, kind: str) -> str | None:
    patterns = [target.modules for _, target in resolve_targets(spec, kind) if target.modules]
    return "|".join(f"(?:{pattern})" for pattern in patterns) if patterns else None


def peft_config(spec: LoraSpec, kind: str):
    """peft's ``LoraConfig`` for a spec."""
    from peft import LoraConfig

    parameters = spec_parameters(spec, kind)
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec_module_regex(spec, kind),
        target_parameters=list(parameters) if parameters else None,
    )


def _unwrapped_name(name: str) -> str:
    """A module or parameter name without the ``.base_layer`` that peft's wrappers insert."""
    return name.replace(".base_layer", "")


def _inside_adapter(name: str) -> bool:
    return any(part.startswith(("lora_", "base_layer")) for part in name.split("."))


def check_targets(model: nn.Module, spec: LoraSpec, kind: str, source: str) -> None:
    """Every target must match something in ``model``, and only module types LoRA supports here (Linear, Conv2d)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = {
        name: (module.get_base_layer() if isinstance(module, BaseTunerLayer) else module)
        for name, module in model.named_modules()
        if name and not _inside_adapter(name)
    }
    parameters = [_unwrapped_name(name) for name, _ in model.named_parameters() if not _inside_adapter_param(name)]
    for name, target in resolve_targets(spec, kind, source):
        if target.modules is not None:
            matched = {n: m for n, m in modules.items() if re.fullmatch(target.modules, n)}
            if not matched:
                raise ConfigError(
                    f"{source}: LoRA target {name!r} matches no module of the {kind} (the {kind} has modules such as "
                    f"{_examples(modules)}). Use a short name ({sorted(TARGETS[kind])}) or a regular expression that "
                    "matches whole module names (re.fullmatch)"
                )
            unsupported = {n: type(m).__name__ for n, m in matched.items() if not isinstance(m, SUPPORTED_MODULES)}
            if unsupported:
                shown = dict(list(unsupported.items())[:4])
                raise ConfigError(
                    f"{source}: LoRA target {name!r} matches modules that are not Linear or Conv2d: {shown}. "
                    "Narrow the regular expression to Linear / Conv2d layers"
                )
        for parameter in target.parameters:
            if not any(p == parameter or p.endswith("." + parameter) for p in parameters):
                raise ConfigError(
                    f"{source}: LoRA target {name!r} names parameter {parameter!r}, which the {kind} does not have; "
                    f"is this the model the adapter was made for?"
                )


def _inside_adapter_param(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _examples(names: Iterable[str], count: int = 4) -> list[str]:
    names = list(names)
    step = max(1, len(names) // count)
    return names[::step][:count]


def apply_lora(
    model: nn.Module, spec: LoraSpec, kind: str, adapter_name: str = "default", source: str = "lora"
) -> nn.Module:
    """Inject a peft LoRA adapter named ``adapter_name`` into ``model`` (in place) and freeze everything else:
    afterwards only the new adapter's ``lora_A`` / ``lora_B`` weights require gradients. Returns ``model``."""
    check_targets(model, spec, kind, source)
    try:
        _inject(model, spec, kind, adapter_name)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ConfigError(f"{source}: peft could not add the LoRA adapter to the {kind}: {error}") from error
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_is_adapter_parameter(name, adapter_name))
    return model


def _inject(model: nn.Module, spec: LoraSpec, kind: str, adapter_name: str) -> None:
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # several adapters in one model is what load_adapters means to do
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        inject_adapter_in_model(peft_config(spec, kind), model, adapter_name=adapter_name)


def _is_adapter_parameter(name: str, adapter_name: str) -> bool:
    parts = name.split(".")
    return any(part.startswith("lora_") and parts[i + 1 : i + 2] == [adapter_name] for i, part in enumerate(parts))


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA weights (``lora_A`` / ``lora_B`` of every adapter) of a model, by name."""
    return {name: p for name, p in model.named_parameters() if _inside_adapter_param(name)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the peft adapters present in ``model``, in the order they were added."""
    from peft.tuners.lora import LoraLayer

    names: list[str] = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            names += [name for name in module.lora_A if name not in names]
    return names


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (adapter name removed), as peft saves them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def save_adapters(
    path: str | Path,
    parts: Mapping[str, tuple[nn.Module, LoraSpec]],
    adapter_name: str = "default",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the adapters of one or both models (``{"unet": (module, spec), "text_encoder": ...}``) as one
    safetensors file, atomically: tensors under ``<kind>.``, the specs in the metadata."""
    from trainer.checkpoints import save_safetensors

    tensors: dict[str, torch.Tensor] = {}
    specs = {}
    for kind, (model, spec) in parts.items():
        _check_kind(kind)
        state = adapter_state_dict(model, adapter_name)
        if not state:
            raise ConfigError(f"the {kind} has no LoRA adapter named {adapter_name!r} to save")
        tensors.update({f"{kind}.{name}": tensor for name, tensor in state.items()})
        specs[kind] = spec.to_json()
    return save_safetensors(tensors, path, {**(metadata or {}), "format": "pt", METADATA_KEY: json.dumps(specs)})


@dataclass
class AdapterFile:
    """An adapter file read back: per kind, its spec and tensors (peft names, no prefix)."""

    path: Path
    specs: dict[str, LoraSpec]
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def read_adapters(path: str | Path) -> AdapterFile:
    """Read an adapter file written by :func:`save_adapters` (a LoRA run's ``export/lora.safetensors``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"LoRA adapter file {path} does not exist")
    what = "give a file written by a LoRA run (its export/lora.safetensors) or by trainer.lora.save_adapters"
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path} is not a LoRA adapter file (not .safetensors): {what}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # noqa: BLE001 - a corrupt file, whatever safetensors says about it
        raise ConfigError(f"{path} cannot be read as safetensors ({error}): {what}") from error
    if METADATA_KEY not in metadata:
        raise ConfigError(f"{path} is not a LoRA adapter file of ours (no {METADATA_KEY!r} metadata): {what}")
    try:
        stored = json.loads(metadata[METADATA_KEY])
        specs = {kind: LoraSpec.from_config(spec, kind, f"{path} [{kind}]") for kind, spec in stored.items()}
    except (json.JSONDecodeError, AttributeError, TypeError) as error:
        raise ConfigError(f"{path}: unreadable {METADATA_KEY!r} metadata ({error}): {what}") from error
    by_kind: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in specs}
    for key, tensor in tensors.items():
        kind, _, name = key.partition(".")
        if kind not in by_kind:
            raise ConfigError(f"{path}: tensor {key!r} belongs to no adapter in its metadata ({sorted(specs)}): {what}")
        by_kind[kind][name] = tensor
    return AdapterFile(path, specs, by_kind, metadata)


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """``FILE:WEIGHT`` -> (FILE, WEIGHT); a bare ``FILE`` has weight 1."""
    path, separator, weight = text.rpartition(":")
    if separator:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def _unique_name(model: nn.Module, stem: str) -> str:
    taken = set(adapter_names(model))
    index = 0
    while f"{stem}{index}" in taken:
        index += 1
    return f"{stem}{index}"


def _check_adapter_tensors(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], kind: str, source: Path
) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{name}: file {tuple(given[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(given))
        if given[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"LoRA adapter {source} does not fit this {kind}: {len(unexpected)} adapted modules the model lacks "
            f"{unexpected[:4]}, {len(missing)} targeted modules without weights in the file {missing[:4]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:4]}. Load it onto the base model it was trained on "
            "(same UNet config / text encoder)"
        )


def set_adapter_weight(model: nn.Module, adapter_name: str, weight: float) -> None:
    """Scale an adapter's output to ``weight * alpha / rank`` in every layer it has (peft's ``set_scale``)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(adapter_name, weight)


def load_adapters(models: Mapping[str, nn.Module | None], adapters: Sequence[tuple[str | Path, float]]) -> list[str]:
    """Add each adapter file, with its weight, to the models it has adapters for (``{"unet": ..., "text_encoder":
    ...}``), for inference: every adapter present (including one the model was trained with) stays active, so the
    deltas add up. Returns the new adapter names. A file whose adapters do not fit raises ConfigError naming it."""
    from peft import set_peft_model_state_dict
    from peft.functional import set_adapter

    added: list[str] = []
    touched: dict[str, nn.Module] = {}
    for path, weight in adapters:
        adapter_file = read_adapters(path)
        for kind, spec in adapter_file.specs.items():
            model = models.get(kind)
            if model is None:
                raise ConfigError(f"LoRA adapter {path} has {kind} adapters, but no {kind} was given to load them into")
            name = _unique_name(model, "lora")
            apply_lora(model, spec, kind, name, source=f"LoRA adapter {path}")
            _check_adapter_tensors(adapter_state_dict(model, name), adapter_file.tensors[kind], kind, Path(path))
            set_peft_model_state_dict(model, adapter_file.tensors[kind], adapter_name=name)
            set_adapter_weight(model, name, float(weight))
            added.append(name)
            touched[kind] = model
    for model in touched.values():
        set_adapter(model, adapter_names(model), inference_mode=True)  # all active; nothing trains
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return added


def merge_adapters(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge every active adapter (at its weight) into the base weights and remove the LoRA layers, in place, with
    peft's ``merge`` (``safe``: check the merged weights are finite). Afterwards the module has its original layout
    and parameter names. Returns ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    while True:
        layers = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        if not layers:
            break
        name, layer = layers[0]  # the outermost first: a wrapper's base may itself be a wrapper
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if hasattr(layer, "unload_and_optionally_merge_module"):
            base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=safe, adapter_names=None)
        else:
            layer.merge(safe_merge=safe)
            base = layer.get_base_layer()
        setattr(parent, child, base)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def _skeleton(state: Mapping[str, torch.Tensor], paths: Iterable[str], parameters: Sequence[str], source: str):
    """A module tree holding, at each adapted path, a Linear / Conv2d (or, for parameter targets, a bare module with
    that parameter) built from the base tensors, so that peft can merge into them without the full model."""
    root = nn.Module()
    for path in paths:
        owned = []  # the targeted parameters this path holds: "attn.in_proj_weight" at a path ending in "attn"
        for parameter in parameters:
            module_part, _, short = parameter.rpartition(".")
            at_path = not module_part or path == module_part or path.endswith("." + module_part)
            if at_path and f"{path}.{short}" in state:
                owned.append(short)
        if owned:
            module = nn.Module()
            for short in owned:
                module.register_parameter(short, nn.Parameter(state[f"{path}.{short}"].clone(), requires_grad=False))
        else:
            weight = state.get(f"{path}.weight")
            if weight is None:
                raise ConfigError(
                    f"{source} has no weights for the adapted module {path!r} ({path}.weight): the adapter was "
                    "trained on another model; merge it into the base weights it was trained on"
                )
            bias = state.get(f"{path}.bias")
            if weight.ndim == 2:
                module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            elif weight.ndim == 4:
                module = nn.Conv2d(
                    weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None, device="meta"
                )
            else:
                raise ConfigError(
                    f"{source}: adapted module {path!r} has a {weight.ndim}-D weight; LoRA merges 2-D/4-D"
                )
            module.weight = nn.Parameter(weight.clone(), requires_grad=False)
            if bias is not None:
                module.bias = nn.Parameter(bias.clone(), requires_grad=False)
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return root


def _adapted_paths(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    paths = []
    for name in tensors:
        match = re.match(r"(.*)\.lora_[AB]\.weight$", name)
        if match and match[1] not in paths:
            paths.append(match[1])
    return paths


def merge_into_state_dict(
    state: Mapping[str, torch.Tensor], adapters: Sequence[tuple[AdapterFile, float]], kind: str, source: str
) -> dict[str, torch.Tensor]:
    """Base weights (``state``: one model's tensors, no prefix) with the ``kind`` adapters of ``adapters`` merged in at
    their weights, through peft; tensors no adapter touches are passed through. ``source`` names the base in errors."""
    from peft import set_peft_model_state_dict
    from peft.functional import set_adapter

    used = [(adapter, weight) for adapter, weight in adapters if kind in adapter.specs]
    if not used:
        return dict(state)
    paths = list(dict.fromkeys(p for adapter, _ in used for p in _adapted_paths(adapter.tensors[kind])))
    parameters = sorted({p for adapter, _ in used for p in spec_parameters(adapter.specs[kind], kind)})
    skeleton = _skeleton(state, paths, parameters, source)
    for index, (adapter, weight) in enumerate(used):
        name = f"lora{index}"
        try:
            _inject(skeleton, adapter.specs[kind], kind, name)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ConfigError(f"LoRA adapter {adapter.path} cannot be merged into {source}: {error}") from error
        _check_adapter_tensors(adapter_state_dict(skeleton, name), adapter.tensors[kind], kind, adapter.path)
        set_peft_model_state_dict(skeleton, adapter.tensors[kind], adapter_name=name)
        set_adapter_weight(skeleton, name, float(weight))
    set_adapter(skeleton, adapter_names(skeleton), inference_mode=True)
    merge_adapters(skeleton)
    merged = dict(state)
    for name, tensor in skeleton.state_dict().items():
        if name not in merged:
            raise ConfigError(f"merging into {source} produced an unexpected tensor {name!r}")
        merged[name] = tensor.to(merged[name].dtype)
    return merged


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
