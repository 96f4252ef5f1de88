"""Build LoRA files in every community format on the tiny pipelines, with the deltas they must produce.

Each builder writes one file in one format's own naming and tensor layout (as kohya, LyCORIS, A1111
and diffusers write them) and returns a `BuiltLora`: the path plus, for every targeted layer, the
weight delta computed here in float64 from that format's own formula

    kohya/LoCon   alpha / rank * up @ down              (no alpha: scale 1; Tucker: up . mid . down)
    LoHa          alpha / rank * (w1a @ w1b) * (w2a @ w2b)  (Tucker: A1111's make_weight_cp)
    LoKr          scale * kron(w1, w2), scale = alpha / rank of a factored part, 1 if both are full
    diffusers     lora_alpha / r * B @ A                  (from `lora_adapter_metadata`, else 1)

independently of `studio.lora_io`, so tests of the reader, of `Studio` and of merging can compare
against it. Layers are keyed "<component>.<module path in the installed transformers layout>".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
RESNET_TO_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
SGM_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
TRAINING_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_learning_rate": "0.0001",
    "ss_tag_frequency": json.dumps({"10_sks": {"sks shape": 12, "striped": 7, "purple star": 3}}),
}


@dataclass
class BuiltLora:
    """A LoRA file written by a factory and what loading it must do to each layer."""

    path: Path
    family: str  # "sd1" | "sdxl"
    format: str  # what `read_lora` must call it
    deltas: dict[str, torch.Tensor]  # "<component>.<module>" -> delta W, the layer's weight shape, float32
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: layer -> per-output-row magnitude
    ranks: set[int] = field(default_factory=set)
    alphas: set[float] = field(default_factory=set)
    kohya_names: dict[str, str] = field(default_factory=dict)  # layer -> kohya module name, for kohya files

    @property
    def components(self) -> list[str]:
        return sorted({key.split(".", 1)[0] for key in self.deltas})


# ---------------------------------------------------------------------------------------------------
# Targets and names


def lora_targets(pipe, conv: bool = False, distinct: bool = False) -> dict[str, torch.nn.Module]:
    """'component.module' -> layer: the UNet's attention blocks and the text encoders' attention/MLP
    layers (what kohya trains by default); with `conv`, also every other UNet linear/convolution
    (ResNet convolutions, samplers, conv_in/conv_out, time and added-condition embeddings).

    `distinct` keeps one layer per (component, last two name parts, weight shape): every kind of
    layer, a fraction of the count, for tests whose cost grows with the number of adapted layers."""
    targets, seen = {}, set()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if ".lora_" in name or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            name = name.removesuffix(".base_layer")  # a layer a previous test wrapped with peft
            kind = (component, ".".join(name.split(".")[-2:]), tuple(module.weight.shape))
            if distinct and kind in seen:
                continue
            seen.add(kind)
            if component == "unet":
                if ".attentions." in name or conv:
                    targets[f"unet.{name}"] = module
            elif name.endswith(TEXT_TARGETS):
                targets[f"{component}.{name}"] = module
    return targets


def sgm_path(module: str) -> str:
    """A diffusers UNet path -> SDXL's original (sgm) module name, as kohya's SDXL trainer names it."""
    if module in SGM_TOP_LEVEL:
        return SGM_TOP_LEVEL[module]
    parts = module.split(".")
    if parts[0] == "mid_block":
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
        rest = parts[3:]
        if parts[1] == "resnets":
            rest = [RESNET_TO_SGM[rest[0]]]
        return ".".join(["middle_block", str(index), *rest])
    level = int(parts[1])
    if parts[2] == "downsamplers":
        return f"input_blocks.{3 * level + 3}.0.op"
    if parts[2] == "upsamplers":
        return f"output_blocks.{3 * level + 2}.2.conv"
    layer = int(parts[3])
    index = 3 * level + layer + 1 if parts[0] == "down_blocks" else 3 * level + layer
    block = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
    rest = [RESNET_TO_SGM[parts[4]]] if parts[2] == "resnets" else parts[4:]
    return ".".join([block, str(index), "0" if parts[2] == "resnets" else "1", *rest])


def kohya_name(key: str, family: str, unet_naming: str) -> str:
    """The name kohya's trainer gives a layer: transformers-4 text encoder paths, '.' -> '_'."""
    component, module = key.split(".", 1)
    if component == "unet":
        return "lora_unet_" + (sgm_path(module) if unet_naming == "sgm" else module).replace(".", "_")
    prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")


def transformers4_key(key: str) -> str:
    """A layer key in the layout diffusers wrote under transformers 4 (`text_encoder.text_model.encoder...`)."""
    component, module = key.split(".", 1)
    if component == "unet":
        return key
    return f"{component}.text_model.{module.removeprefix('text_model.')}"


def _factor_split(n: int) -> tuple[int, int]:
    """n = a * b with a the largest of 4, 2, 1 dividing n (LoKr's Kronecker factor sizes)."""
    a = next(f for f in (4, 2, 1) if n % f == 0)
    return a, n // a


# ---------------------------------------------------------------------------------------------------
# Builders


def kohya_lora(
    pipe,
    path: Path,
    family: str,
    conv: bool = False,
    dora: bool = False,
    tucker: bool = False,
    unet_naming: str | None = None,
    dtype: torch.dtype = torch.float32,
    text_encoders: bool = True,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    distinct: bool = False,
) -> BuiltLora:
    """kohya/A1111 naming: lora_down / lora_up / alpha; ranks 4, 2, 3 and alphas rank/2, 1, absent in turn.

    `conv` adds the LoCon convolution layers (`tucker`: 3x3 ones as LyCORIS Tucker down/mid/up);
    `dora` adds a per-output-row `dora_scale` (LyCORIS wd_on_out=True). SDXL uses the sgm UNet names.
    """
    generator = torch.Generator().manual_seed(seed)
    unet_naming = unet_naming or ("sgm" if family == "sdxl" else "diffusers")
    tensors, built = {}, BuiltLora(path, family, "dora" if dora else "locon" if conv else "kohya", {})
    for i, (key, layer) in enumerate(lora_targets(pipe, conv, distinct).items()):
        if not text_encoders and not key.startswith("unet."):
            continue
        name = kohya_name(key, family, unet_naming)
        rank = (4, 2, 3)[i % 3]
        alpha = (rank / 2, 1.0, None)[i % 3]
        weight = layer.weight.detach()
        out_features, in_features = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        if tucker and kernel and kernel != (1, 1):
            down = torch.randn(rank, in_features, 1, 1, generator=generator) * 0.2
            mid = torch.randn(rank, rank, *kernel, generator=generator) * 0.2
            up = torch.randn(out_features, rank, 1, 1, generator=generator) * 0.2
            tensors[f"{name}.lora_mid.weight"] = mid.to(dtype)
            product = torch.einsum(
                "oa,abhw,bi->oihw",
                up.flatten(1).to(dtype).double(),
                mid.to(dtype).double(),
                down.flatten(1).to(dtype).double(),
            )
        else:
            down = torch.randn(rank, in_features, *kernel, generator=generator) * 0.2
            up = torch.randn(out_features, rank, *([1, 1] if kernel else []), generator=generator) * 0.2
            product = (up.flatten(1).to(dtype).double() @ down.flatten(1).to(dtype).double()).reshape(weight.shape)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
        delta = product * (alpha / rank if alpha is not None else 1.0)
        built.deltas[key] = delta.float()
        built.kohya_names[key] = name
        built.ranks.add(rank)
        if alpha is not None:
            built.alphas.add(alpha)
        if dora:
            norm = (weight.double() + delta).flatten(1).norm(dim=1)
            magnitude = (norm * (1 + 0.3 * torch.rand(out_features, generator=generator, dtype=torch.float64))).to(
                dtype
            )
            tensors[f"{name}.dora_scale"] = magnitude.reshape(out_features, *[1] * (weight.dim() - 1))
            built.magnitudes[key] = magnitude.float()
    save_file(tensors, str(path), metadata={**TRAINING_METADATA, **(metadata or {})})
    return built


def diffusers_lora(
    pipe,
    path: Path,
    family: str,
    transformers4_layout: bool = False,
    adapter_metadata: bool = False,
    dora: bool = False,
    conv: bool = False,
    seed: int = 1,
    metadata: dict[str, str] | None = None,
    distinct: bool = False,
) -> BuiltLora:
    """diffusers/peft naming: <component>.<module>.lora_A/lora_B.weight, ranks 4 and 2.

    `transformers4_layout` writes text encoders as diffusers did under transformers 4
    (`text_encoder.text_model.encoder...`); `adapter_metadata` stores diffusers' `lora_adapter_metadata`
    with lora_alpha = 2 * r and an alpha_pattern, so scales are not 1; `dora` adds peft's bare
    `lora_magnitude_vector` keys, as peft saves them ((out,), convolutions (1, out, 1, 1)).
    """
    generator = torch.Generator().manual_seed(seed)
    tensors, built = {}, BuiltLora(path, family, "dora" if dora else "diffusers", {})
    config: dict[str, dict] = {}
    for i, (key, layer) in enumerate(lora_targets(pipe, conv, distinct).items()):
        component = key.split(".", 1)[0]
        rank = (4, 2)[i % 2]
        weight = layer.weight.detach()
        kernel = tuple(weight.shape[2:])
        down = torch.randn(rank, weight.shape[1], *kernel, generator=generator) * 0.2
        up = torch.randn(weight.shape[0], rank, *([1, 1] if kernel else []), generator=generator) * 0.2
        file_key = transformers4_key(key) if transformers4_layout else key
        tensors[f"{file_key}.lora_A.weight"] = down
        tensors[f"{file_key}.lora_B.weight"] = up
        scale = 1.0
        if adapter_metadata:
            component_config = config.setdefault(
                component, {"r": 4, "lora_alpha": 8.0, "alpha_pattern": {}, "rank_pattern": {}}
            )
            alpha = 8.0
            if rank != 4:
                component_config["rank_pattern"][file_key.split(".", 1)[1]] = rank
            if i % 5 == 0:  # a few modules with their own alpha
                alpha = 3.0
                component_config["alpha_pattern"][file_key.split(".", 1)[1]] = alpha
            scale = alpha / rank
            built.alphas.add(alpha)
        delta = scale * (up.flatten(1).double() @ down.flatten(1).double()).reshape(weight.shape)
        built.deltas[key] = delta.float()
        built.ranks.add(rank)
        if dora:
            norm = (weight.double() + delta).flatten(1).norm(dim=1)
            magnitude = (
                norm * (1 + 0.3 * torch.rand(weight.shape[0], generator=generator, dtype=torch.float64))
            ).float()
            tensors[f"{file_key}.lora_magnitude_vector"] = (
                magnitude.reshape(1, -1, 1, 1) if kernel else magnitude
            )  # peft's shapes
            built.magnitudes[key] = magnitude
    file_metadata = {"format": "pt", **(metadata or {})}
    if adapter_metadata:
        packed = {
            f"{component}.{option}": value for component, options in config.items() for option, value in options.items()
        }
        file_metadata["lora_adapter_metadata"] = json.dumps(packed)
    save_file(tensors, str(path), metadata=file_metadata)
    return built


def loha_lora(
    pipe, path: Path, family: str, conv: bool = False, tucker: bool = False, seed: int = 2, distinct: bool = False
) -> BuiltLora:
    """LyCORIS LoHa: hada_w1_a/b, hada_w2_a/b (+ hada_t1/t2 for 3x3 convolutions with `tucker`).

    Ranks 2, 3 and 6 in turn: 6 * 6 = 36 exceeds the tiny text encoder's 32 channels, which exercises
    the reader's full-rank fallback. Alphas 1, rank, absent in turn.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors, built = {}, BuiltLora(path, family, "loha", {})
    for i, (key, layer) in enumerate(lora_targets(pipe, conv, distinct).items()):
        name = kohya_name(key, family, "sgm" if family == "sdxl" else "diffusers")
        rank = (2, 3, 6)[i % 3]
        alpha = (1.0, float(rank), None)[i % 3]
        weight = layer.weight.detach()
        out_features, in_features = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        halves = []
        for half in (1, 2):
            if tucker and kernel and kernel != (1, 1):
                w_a = torch.randn(rank, out_features, generator=generator) * 0.3
                w_b = torch.randn(rank, in_features, generator=generator) * 0.3
                core = torch.randn(rank, rank, *kernel, generator=generator) * 0.3
                tensors[f"{name}.hada_t{half}"] = core
                # A1111's make_weight_cp(t, wa, wb)
                temp = torch.einsum("ijkl,jr->irkl", core.double(), w_b.double())
                halves.append(torch.einsum("ijkl,ir->rjkl", temp, w_a.double()))
            else:
                w_a = torch.randn(out_features, rank, generator=generator) * 0.3
                w_b = torch.randn(rank, in_features * math.prod(kernel), generator=generator) * 0.3
                halves.append((w_a.double() @ w_b.double()).reshape(weight.shape))
            tensors[f"{name}.hada_w{half}_a"] = w_a
            tensors[f"{name}.hada_w{half}_b"] = w_b
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
            built.alphas.add(alpha)
        built.deltas[key] = (halves[0] * halves[1] * (alpha / rank if alpha is not None else 1.0)).float()
        built.ranks.add(rank)
    save_file(
        tensors,
        str(path),
        metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"})},
    )
    return built


LOKR_VARIANTS = ("w1_full", "both_factored", "both_full", "tucker")


def lokr_lora(
    pipe, path: Path, family: str, variant: str = "w1_full", conv: bool = False, seed: int = 3, distinct: bool = False
) -> BuiltLora:
    """LyCORIS LoKr, delta = scale * kron(w1, w2) with w1 (a, b), w2 (c, d[, kh, kw]), out = a*c, in = b*d.

    variant "w1_full": lokr_w1 full, lokr_w2_a/b of rank 2 (LyCORIS' default); "both_factored":
    lokr_w1_a/b and lokr_w2_a/b (decompose_both); "both_full": lokr_w1 and lokr_w2 full (scale 1,
    whatever alpha says); "tucker": 3x3 convolutions as lokr_w1 + lokr_t2 + lokr_w2_a/b.
    """
    if variant not in LOKR_VARIANTS:
        raise ValueError(f"variant must be one of {LOKR_VARIANTS}")
    generator = torch.Generator().manual_seed(seed)
    tensors, built = {}, BuiltLora(path, family, "lokr", {})
    rank, alpha = 2, 3.0

    def randn(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    for key, layer in lora_targets(pipe, conv or variant == "tucker", distinct).items():
        name = kohya_name(key, family, "sgm" if family == "sdxl" else "diffusers")
        weight = layer.weight.detach()
        out_features, in_features = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        a, c = _factor_split(out_features)
        b, d = _factor_split(in_features)
        if variant == "both_factored":
            w1_a, w1_b = randn(a, rank), randn(rank, b)
            tensors[f"{name}.lokr_w1_a"], tensors[f"{name}.lokr_w1_b"] = w1_a, w1_b
            w1 = w1_a.double() @ w1_b.double()
        else:
            w1 = randn(a, b)
            tensors[f"{name}.lokr_w1"] = w1
            w1 = w1.double()
        if variant == "both_full":
            w2 = randn(c, d, *kernel)
            tensors[f"{name}.lokr_w2"] = w2
            w2 = w2.double()
        elif variant == "tucker" and kernel and kernel != (1, 1):
            w2_a, w2_b, core = randn(rank, c), randn(rank, d), randn(rank, rank, *kernel)
            tensors[f"{name}.lokr_w2_a"], tensors[f"{name}.lokr_w2_b"], tensors[f"{name}.lokr_t2"] = w2_a, w2_b, core
            temp = torch.einsum("ijkl,jr->irkl", core.double(), w2_b.double())  # A1111's make_weight_cp
            w2 = torch.einsum("ijkl,ir->rjkl", temp, w2_a.double())
        else:
            w2_a, w2_b = randn(c, rank), randn(rank, d * math.prod(kernel))
            tensors[f"{name}.lokr_w2_a"], tensors[f"{name}.lokr_w2_b"] = w2_a, w2_b
            w2 = w2_a.double() @ w2_b.double()
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        scale = 1.0 if variant == "both_full" else alpha / rank
        if w2.dim() == 4:  # A1111's make_kron
            delta = torch.kron(w1[:, :, None, None], w2)
        else:
            delta = torch.kron(w1, w2)
        built.deltas[key] = (scale * delta.reshape(weight.shape)).float()
        built.alphas.add(alpha)
        if variant != "both_full":
            built.ranks.add(rank)
    save_file(
        tensors,
        str(path),
        metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr"})},
    )
    return built


# ---------------------------------------------------------------------------------------------------
# What a layer must compute


def expected_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """W + delta, or for DoRA m / ||W + delta||_row * (W + delta) (LyCORIS wd_on_out=True, peft's DoRA)."""
    merged = weight.double() + delta.double()
    if magnitude is not None:
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
        merged = merged * (magnitude.double().reshape(norm.shape) / norm)
    return merged.float()


def layer_input(layer: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """A random input batch for a linear or convolution layer (peft-wrapped or not)."""
    base = getattr(layer, "base_layer", layer)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(base, torch.nn.Conv2d):
        return torch.randn(2, base.in_channels, 6, 6, generator=generator)
    return torch.randn(3, base.in_features, generator=generator)


def reference_output(layer: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What `layer` computes with `weight` in place of its own."""
    base = getattr(layer, "base_layer", layer)
    if isinstance(base, torch.nn.Conv2d):
        return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight, base.bias)
