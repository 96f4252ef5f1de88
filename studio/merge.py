"""Merge N LoRA files, with weights, into one new LoRA file, one layer at a time.

The methods are those of peft's `LoraModel.add_weighted_adapter` (peft 0.21), which works only on a
peft model, not on LoRA files or on the adapters diffusers injects. Inputs are any format
`studio.lora_io` reads; their scales are baked into their factors, so input i changes a layer by
delta_i = B_i @ A_i (peft's `scaling` is 1), and the merge aims at the weighted sum  sum_i w_i delta_i:

  cat              A = [w_1 A_1; w_2 A_2; ...] (rows), B = [B_1, B_2, ...] (columns), the weight on A
                   only: B @ A = sum_i w_i B_i A_i EXACTLY. Its rank is the sum of the inputs' ranks.
                   The default.
  linear           A = sum_i sign(w_i) sqrt|w_i| A_i,  B = sum_i sqrt|w_i| B_i: A and B are mixed
                   separately, so B @ A also holds the cross terms B_i A_j (i != j). An APPROXIMATION
                   of the weighted sum, and (as in peft) the inputs need equal ranks.
  ties, dare_linear, dare_ties, magnitude_prune
                   the same weighted A's and B's, combined by peft.utils.merge_utils' `ties`,
                   `dare_linear`, `dare_ties` or `magnitude_prune` instead of a plain sum: they keep
                   a fraction `density` of each factor's entries (the largest, or random ones rescaled
                   by 1/density), TIES-style ones also elect a sign per entry. Approximations too,
                   with equal ranks.
  svd              the BEST rank-k approximation of the weighted sum (Eckart-Young): B = U_k S_k,
                   A = V_k^T of its singular value decomposition, optionally clamped to +-q, q the
                   `clamp` quantile of their entries. Exact at full rank (k >= the sum of the inputs' ranks).
                   k defaults, as in peft, to the largest input rank.

The svd is taken from the factors: with [w_i B_i] = Q_B R_B and [A_i]^T = Q_A R_A (QR), the weighted sum
is Q_B (R_B R_A^T) Q_A^T, so the SVD of that small core is the SVD of the sum. peft runs a dense SVD of
the summed delta instead: the same singular values and vectors (each pair up to its sign, as between
any two SVD routines), 25 to 60 times faster on SDXL's 1280-wide layers.

Streaming: the inputs are opened together (`lora_io.open_lora`) and read one layer at a time, so a
merge holds one layer of each input plus the merged file, never all inputs. A layer that only some
inputs adapt is merged from those (the others count with weight 0, as in peft); inputs for another
model family, or with DoRA magnitudes, are refused before anything is computed or written. The merged
file is in diffusers naming (or kohya's), each layer in the widest dtype of its inputs' factors
(computed in float32), with the recipe in its metadata (`studio.merge`: method, options, and each
source's file name, sha256 and weight) and the union of the inputs' trigger words.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.lora_io import (
    FAMILY_NAMES,
    NAMINGS,
    TRIGGER_WORDS_KEY,
    LoraModule,
    LoraReader,
    file_hashes,
    open_lora,
    trigger_words,
    write_lora,
)

MERGE_METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGN_METHODS = ("total", "frequency")
# The options each method uses, and records in the merged file's metadata.
METHOD_OPTIONS = {
    "cat": (),
    "linear": (),
    "svd": ("rank", "clamp"),
    "ties": ("density", "majority_sign_method"),
    "dare_linear": ("density", "seed"),
    "dare_ties": ("density", "majority_sign_method", "seed"),
    "magnitude_prune": ("density",),
}
EQUAL_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
MERGE_METADATA_KEY = "studio.merge"


@dataclass(frozen=True)
class MergeOptions:
    """How to merge, checked as peft's LoraConfig checks itself: a bad option fails before any file is read."""

    method: str = "cat"
    density: float | None = None  # ties, dare_*, magnitude_prune: fraction of each factor's entries kept, (0, 1]
    rank: int | None = None  # svd: the merged rank (None: the largest input rank of each layer)
    clamp: float | None = None  # svd: clamp the factors' entries to +-q, q this quantile of them, (0, 1]; kohya: 0.99
    majority_sign_method: str = "total"  # ties, dare_ties: elect each entry's sign by "total" value or "frequency"
    naming: str = "diffusers"  # of the merged file: "diffusers" or "kohya"
    seed: int = 0  # dare_*: seeds the random pruning, so a merge can be repeated exactly

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise StudioError(f"unknown merge method {self.method!r}; choose one of {', '.join(MERGE_METHODS)}")
        used = METHOD_OPTIONS[self.method]
        for name in ("density", "rank", "clamp"):
            if getattr(self, name) is not None and name not in used:
                users = [method for method, options in METHOD_OPTIONS.items() if name in options]
                raise StudioError(f"{name} is an option of {', '.join(users)}, not of {self.method}")
        if "density" in used and self.density is None:
            raise StudioError(f"{self.method} needs a density in (0, 1]: the fraction of each factor's entries kept")
        if self.density is not None and not 0 < self.density <= 1:
            raise StudioError(f"density must be in (0, 1] (the fraction of entries kept), got {self.density}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise StudioError(f"rank must be a whole number of at least 1, got {self.rank!r}")
        if self.clamp is not None and not 0 < self.clamp <= 1:
            raise StudioError(f"clamp must be a quantile in (0, 1], got {self.clamp}")
        if self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise StudioError(f"unknown majority sign method {self.majority_sign_method!r}; choose total or frequency")
        if self.naming not in NAMINGS:
            raise StudioError(f"unknown naming {self.naming!r}; choose one of {', '.join(NAMINGS)}")

    def recipe(self) -> dict:
        """The method and the options it used, as the merged file's metadata records them."""
        options = {name: getattr(self, name) for name in METHOD_OPTIONS[self.method]}
        return {"method": self.method, **{name: value for name, value in options.items() if value is not None}}


@dataclass
class _Layer:
    """One layer of the merged file and the inputs that adapt it, each with its weight."""

    component: str
    module: str
    kernel: tuple[int, int] | None
    sources: list[tuple[LoraReader, LoraModule, float]] = field(default_factory=list)


def merge_loras(
    paths: Sequence[str | os.PathLike],
    weights: Sequence[float],
    out: str | os.PathLike,
    method: str = "cat",
    *,
    density: float | None = None,
    rank: int | None = None,
    clamp: float | None = None,
    majority_sign_method: str = "total",
    naming: str = "diffusers",
    seed: int = 0,
    allow_pickle: bool = False,
) -> Path:
    """Merge the LoRA files `paths` with `weights` into the new LoRA file `out` (.safetensors); return its path.

    `cat` (the default) is exact: the merged delta of every layer is the weighted sum of the inputs'
    deltas, so the file renders like the inputs blended at `weights`. `linear`, `ties`, `dare_linear`,
    `dare_ties` and `magnitude_prune` mix the A and B factors separately (peft's definitions), so they
    only approximate that weighted sum and need equal ranks. `svd` is the best rank-`rank` approximation
    of the weighted sum, exact at full rank. Every input and option is checked, and every header read,
    before anything is computed; the file is written atomically, and not at all on error.
    """
    options = MergeOptions(method, density, rank, clamp, majority_sign_method, naming, seed)
    paths, out = [Path(p) for p in paths], Path(out)
    weights = _checked_weights(paths, weights)
    if out.suffix != ".safetensors":
        raise StudioError(f"{out}: merged LoRAs are written as .safetensors only")
    if not out.parent.is_dir():
        raise StudioError(f"{out}: the folder {out.parent} does not exist")
    if any(out.resolve() == path.resolve() for path in paths):
        raise StudioError(f"{out}: is one of the LoRAs merged; write the merge to another file")

    with ExitStack() as stack:
        loras = [stack.enter_context(open_lora(path, allow_pickle)) for path in paths]
        layers = _plan(loras, weights, options)
        state_dict = {}
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(options.seed)  # DARE's pruning draws from torch's global generator
            # peft warns for every tensor that density 1 prunes nothing; here that is a valid choice.
            warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
            for layer in layers:
                prefix = f"{layer.component}.{layer.module}"
                state_dict[f"{prefix}.lora_A.weight"], state_dict[f"{prefix}.lora_B.weight"] = _merge_layer(
                    layer, options
                )
        metadata = _metadata(loras, weights, options)
        family = loras[0].family
    overflowed = [key for key, tensor in state_dict.items() if not torch.isfinite(tensor).all()]
    if overflowed:
        raise StudioError(
            f"{out}: the merged {overflowed[0]} is not finite (too large for its "
            f"{state_dict[overflowed[0]].dtype}); use smaller weights. Nothing was written"
        )
    return write_lora(out, state_dict, metadata, naming=options.naming, family=family)


def _checked_weights(paths: list[Path], weights: Sequence[float]) -> list[float]:
    if len(paths) < 2:
        raise StudioError(f"merging needs at least two LoRA files, got {len(paths)}")
    if len(weights) != len(paths):
        raise StudioError(f"got {len(weights)} weights for {len(paths)} LoRA files; give one weight per file")
    checked = []
    for path, weight in zip(paths, weights):
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise StudioError(f"{path}: its weight {weight!r} is not a number") from None
        if not math.isfinite(weight):
            raise StudioError(f"{path}: its weight {weight} is not a finite number")
        checked.append(weight)
    return checked


def _plan(loras: list[LoraReader], weights: list[float], options: MergeOptions) -> list[_Layer]:
    """Group the inputs' modules by layer (in the order they first appear), refusing what cannot be merged."""
    first = loras[0]
    layers: dict[tuple[str, str], _Layer] = {}
    for lora, weight in zip(loras, weights):
        if lora.family != first.family:
            raise StudioError(
                f"{lora.path} is a {FAMILY_NAMES[lora.family]} LoRA ({lora.family}) but {first.path} is for "
                f"{FAMILY_NAMES[first.family]} ({first.family}); LoRAs of different model families cannot be merged"
            )
        if dora := next((m for m in lora.modules if m.dora), None):
            raise StudioError(
                f"{lora.path}: module {dora.file_name} is DoRA; its magnitude vectors rescale W + delta per output "
                "row, which cannot be merged without the base model's weights"
            )
        for module in lora.modules:
            layer = layers.setdefault(
                (module.component, module.module), _Layer(module.component, module.module, module.kernel)
            )
            if layer.sources:
                _check_compatible(layer.sources[0][:2], (lora, module), options)
            layer.kernel = layer.kernel or module.kernel
            layer.sources.append((lora, module, weight))
    return list(layers.values())


def _check_compatible(
    a: tuple[LoraReader, LoraModule], b: tuple[LoraReader, LoraModule], options: MergeOptions
) -> None:
    """Two inputs' modules for the same layer: same layer shape, and equal ranks where the method needs them."""
    (lora_a, module_a), (lora_b, module_b) = a, b
    shape_a, shape_b = (
        [m.out_features, m.in_features, *(m.kernel or (1, 1))] for m in (module_a, module_b)
    )  # a linear layer and a 1x1 convolution combine alike
    if shape_a != shape_b:
        raise StudioError(
            f"{lora_b.path}: {module_b.component}.{module_b.module} has shape {shape_b} but in {lora_a.path} "
            f"it has {shape_a}; these LoRAs were made for different models"
        )
    if options.method in EQUAL_RANK_METHODS and module_a.converted_rank != module_b.converted_rank:
        raise StudioError(
            f"{lora_b.path}: {module_b.component}.{module_b.module} has rank {module_b.converted_rank} but "
            f"{module_a.converted_rank} in {lora_a.path}; {options.method} mixes A and B factors entry by entry, "
            "so (as in peft) it needs equal ranks: use cat or svd"
        )


def _merge_layer(layer: _Layer, options: MergeOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of one merged layer, from one module of each input that adapts it."""
    downs, ups, dtypes = [], [], []
    for lora, module, _ in layer.sources:
        down, up = lora.factors(module)
        dtypes += [down.dtype, up.dtype]
        downs.append(down.flatten(1).float())  # convolutions as (rank, in * kh * kw), as peft's svd does
        ups.append(up.flatten(1).float())
    weights = [weight for _, _, weight in layer.sources]
    if options.method == "cat":
        down, up = _cat(downs, ups, weights)
    elif options.method == "svd":
        down, up = _svd(downs, ups, weights, options)
    else:
        down, up = _mix_factors(downs, ups, weights, options)
    dtype = functools.reduce(torch.promote_types, dtypes)
    if layer.kernel is not None:
        down, up = down.reshape(down.shape[0], -1, *layer.kernel), up.reshape(*up.shape, 1, 1)
    return down.to(dtype).contiguous(), up.to(dtype).contiguous()


def _cat(downs: list[torch.Tensor], ups: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's cat: the weighted A's stacked by rows, the B's side by side; B @ A = sum_i w_i B_i A_i."""
    return torch.cat([weight * down for down, weight in zip(downs, weights)]), torch.cat(ups, dim=1)


def _mix_factors(
    downs: list[torch.Tensor], ups: list[torch.Tensor], weights: list[float], options: MergeOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's `_generalized_task_arithmetic_weighted_adapter`: sqrt|w| on A and on B, w's sign on A only,
    then A's and B's combined separately by the method's function from peft.utils.merge_utils."""
    # Imported here: peft takes seconds to import, and `python -m studio.lora inspect` imports this module.
    from peft.utils.merge_utils import dare_linear, dare_ties, magnitude_prune, task_arithmetic, ties

    combine = {
        "linear": task_arithmetic,
        "ties": functools.partial(ties, density=options.density, majority_sign_method=options.majority_sign_method),
        "dare_linear": functools.partial(dare_linear, density=options.density),
        "dare_ties": functools.partial(
            dare_ties, density=options.density, majority_sign_method=options.majority_sign_method
        ),
        "magnitude_prune": functools.partial(magnitude_prune, density=options.density),
    }[options.method]
    roots = [math.sqrt(abs(weight)) for weight in weights]
    weights_a = torch.tensor([root if weight >= 0 else -root for root, weight in zip(roots, weights)])
    return combine(downs, weights_a), combine(ups, torch.tensor(roots))


def _svd(
    downs: list[torch.Tensor], ups: list[torch.Tensor], weights: list[float], options: MergeOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's svd merge: B = U_k S_k, A = V_k^T of the weighted sum, k = `rank` or the largest input rank;
    the SVD through QR of the stacked factors (module docstring). k is at most the sum's own rank bound."""
    down, up = _cat(downs, ups, weights)  # up @ down is the weighted sum, exactly
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    k = min(options.rank or max(d.shape[0] for d in downs), s.numel())
    up, down = q_up @ (u[:, :k] * s[:k]), vh[:k] @ q_down.T
    if options.clamp is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), options.clamp)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    return down, up


def _metadata(loras: list[LoraReader], weights: list[float], options: MergeOptions) -> dict[str, str]:
    """The recipe (method, options, each source's file name, sha256 and weight), family and trigger words."""
    sources = [
        {"file": lora.path.name, "sha256": file_hashes(lora.path)["sha256"], "weight": weight}
        for lora, weight in zip(loras, weights)
    ]
    metadata = {
        MERGE_METADATA_KEY: json.dumps({**options.recipe(), "sources": sources}),
        "studio.family": loras[0].family,
    }
    words = list(dict.fromkeys(word for lora in loras for word in trigger_words(lora.metadata)))
    if words:
        metadata[TRIGGER_WORDS_KEY] = ", ".join(words)  # as the trainer writes them
    return metadata
