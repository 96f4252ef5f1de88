"""`studio.merge`: N LoRA files -> one, with peft's `add_weighted_adapter` methods, one layer at a time.

Expected values come from the factories' own deltas (tests/lora_factories.py, float64 from each format's
formula), from factors written by hand here, or from peft itself; never from the merge under test.
"""

import hashlib
import json
import math
import weakref

import numpy as np
import pytest
import torch
from lora_factories import diffusers_lora, kohya_lora, layer_input, loha_lora, lokr_lora, reference_output
from peft import LoraConfig, get_peft_model
from peft.utils.merge_utils import dare_linear
from safetensors.torch import load_file, save_file

from studio.adapters import Studio
from studio.errors import StudioError
from studio.lora import main
from studio.lora_io import LoraReader, inspect, read_lora
from studio.merge import MERGE_METHODS, merge_loras
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

LAYER = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OTHER_LAYER = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"


@pytest.fixture(scope="module")
def pipes():
    return {"sd1": tiny_sd_pipeline(0), "sdxl": tiny_sdxl_pipeline(0)}


@pytest.fixture(scope="module")
def files(pipes, tmp_path_factory):
    """Per family: a kohya LoCon file (ranks 4/2/3, alphas, convolutions only it adapts) and a diffusers
    file with a saved LoraConfig (ranks 4/2, scales not 1), both on one layer of every kind."""
    folder = tmp_path_factory.mktemp("merge-inputs")
    built = {}
    for family, pipe in pipes.items():
        built[family] = {
            "kohya": kohya_lora(pipe, folder / f"{family}-kohya.safetensors", family, conv=True, distinct=True),
            "diffusers": diffusers_lora(
                pipe, folder / f"{family}-diffusers.safetensors", family, adapter_metadata=True, distinct=True
            ),
        }
    return built


def merged_deltas(path):
    """'component.module' -> B @ A of a LoRA file, flattened to (out, in * kh * kw), float64."""
    lora = read_lora(path)
    return {
        f"{m.component}.{m.module}": lora.state_dict[f"{m.component}.{m.module}.lora_B.weight"].flatten(1).double()
        @ lora.state_dict[f"{m.component}.{m.module}.lora_A.weight"].flatten(1).double()
        for m in lora.modules
    }


def weighted_sum(inputs, weights):
    """sum_i w_i delta_i from the factories' deltas; a layer an input lacks counts 0 for it."""
    keys = set().union(*(built.deltas for built in inputs))
    return {
        key: sum(w * built.deltas[key].flatten(1).double() for built, w in zip(inputs, weights) if key in built.deltas)
        for key in keys
    }


def small_lora(path, layers, metadata=None):
    """A diffusers-named file with hand-written factors: {layer: (A rows, B rows)}; scale 1."""
    tensors = {}
    for layer, (down, up) in layers.items():
        tensors[f"{layer}.lora_A.weight"] = torch.tensor(down, dtype=torch.float32)
        tensors[f"{layer}.lora_B.weight"] = torch.tensor(up, dtype=torch.float32)
    save_file(tensors, str(path), metadata=metadata)
    return path


def product(up, down):
    return torch.tensor(up, dtype=torch.float64) @ torch.tensor(down, dtype=torch.float64)


def factors(path, layer=LAYER):
    state_dict = read_lora(path).state_dict
    return state_dict[f"{layer}.lora_A.weight"], state_dict[f"{layer}.lora_B.weight"]


# ---------------------------------------------------------------------------------------------------
# cat: exact


def test_a_merge_too_large_for_its_dtype_is_refused_and_writes_nothing(pipes, tmp_path):
    half = tmp_path / "half.safetensors"
    diffusers_lora(pipes["sd1"], tmp_path / "full.safetensors", "sd1")
    save_file({k: v.half() for k, v in load_file(tmp_path / "full.safetensors").items()}, half)
    with pytest.raises(StudioError, match=r"merged .* is not finite \(too large for its torch.float16\)"):
        merge_loras([half, half], [1e6, 1e6], out=tmp_path / "big.safetensors")
    assert not (tmp_path / "big.safetensors").exists()


def test_a_merge_never_writes_over_one_of_its_inputs(pipes, tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    diffusers_lora(pipes["sd1"], first, "sd1", seed=1)
    diffusers_lora(pipes["sd1"], second, "sd1", seed=2)
    before = first.read_bytes()
    with pytest.raises(StudioError, match=r"a.safetensors: is one of the LoRAs merged; write the merge to another"):
        merge_loras([first, second], [1.0, 1.0], out=tmp_path / "." / "a.safetensors")
    assert first.read_bytes() == before


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cat_delta_is_exactly_the_weighted_sum_of_the_deltas(family, files, tmp_path):
    inputs, weights = [files[family]["kohya"], files[family]["diffusers"]], [0.7, -0.4]
    out = merge_loras([b.path for b in inputs], weights, tmp_path / "cat.safetensors")
    merged, expected = merged_deltas(out), weighted_sum(inputs, weights)
    assert set(inputs[0].deltas) != set(inputs[1].deltas)  # the LoCon convolutions are in one input only
    assert set(merged) == set(expected)
    assert {key.split(".")[0] for key in merged} >= {"unet", "text_encoder"} | (
        {"text_encoder_2"} if family == "sdxl" else set()
    )
    for key, delta in expected.items():
        torch.testing.assert_close(merged[key], delta, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("source", ["tiny-sd", "tiny-sdxl"])
def test_cat_renders_like_the_inputs_blended_at_the_same_weights(source, files, tmp_path):
    family = "sd1" if source == "tiny-sd" else "sdxl"
    a, b = files[family]["kohya"].path, files[family]["diffusers"].path
    out = merge_loras([a, b], [0.8, 0.5], tmp_path / "cat.safetensors")
    studio = Studio.from_base(source)
    for name, path in (("a", a), ("b", b), ("merged", out)):
        studio.load_adapter(path, name=name)

    def render(weights, enabled=True):
        blend = studio.make_blend(weights, enabled=enabled)
        return np.asarray(studio.generate("a red circle", seed=0, steps=2, blend=blend)[0]).astype(int)

    blended, merged, base = render({"a": 0.8, "b": 0.5}), render({"merged": 1.0}), render({}, enabled=False)
    assert np.abs(blended - base).max() > 20  # the blend does change the picture
    assert np.abs(merged - blended).max() <= 1  # uint8 levels: float summation order differs


def test_loha_and_lokr_inputs_merge_exactly_with_cat(pipes, tmp_path):
    inputs = [
        loha_lora(pipes["sd1"], tmp_path / "loha.safetensors", "sd1", distinct=True),
        lokr_lora(pipes["sd1"], tmp_path / "lokr.safetensors", "sd1", distinct=True),
    ]
    merged = merged_deltas(merge_loras([b.path for b in inputs], [0.5, 1.5], tmp_path / "cat.safetensors"))
    expected = weighted_sum(inputs, [0.5, 1.5])
    assert set(merged) == set(expected)
    for key, delta in expected.items():
        torch.testing.assert_close(merged[key], delta, rtol=1e-5, atol=1e-5, msg=key)


def test_cat_takes_different_ranks_and_a_layer_only_one_input_has(tmp_path):
    a = small_lora(tmp_path / "a.safetensors", {LAYER: ([[1, 2, 3], [0, 1, 0]], [[1, 0], [0, 1], [1, 1]]),
                                                OTHER_LAYER: ([[1, -1, 2]], [[2], [0], [1]])})  # fmt: skip
    b = small_lora(tmp_path / "b.safetensors", {LAYER: ([[0, 0, 1]], [[3], [1], [0]])})
    merged = merged_deltas(merge_loras([a, b], [2.0, -1.0], tmp_path / "cat.safetensors"))
    layer_a = product([[1, 0], [0, 1], [1, 1]], [[1, 2, 3], [0, 1, 0]])
    torch.testing.assert_close(merged[LAYER], 2 * layer_a - product([[3], [1], [0]], [[0, 0, 1]]))
    torch.testing.assert_close(merged[OTHER_LAYER], 2 * product([[2], [0], [1]], [[1, -1, 2]]))
    assert factors(tmp_path / "cat.safetensors")[0].shape == (3, 3)  # rank 2 + 1


# ---------------------------------------------------------------------------------------------------
# linear and the pruning methods: peft's definitions


def test_linear_mixes_sqrt_weighted_factors_as_peft_and_only_approximates_the_weighted_sum(pipes, tmp_path):
    inputs = [diffusers_lora(pipes["sd1"], tmp_path / f"{i}.safetensors", "sd1", seed=i, distinct=True) for i in (1, 2)]
    weights = [0.7, -0.4]
    out = merge_loras([b.path for b in inputs], weights, tmp_path / "linear.safetensors", method="linear")
    raw = [load_file(str(b.path)) for b in inputs]  # scale 1: the file's factors are the deltas' factors
    merged = read_lora(out).state_dict
    assert set(merged) == set(raw[0])
    for key in raw[0]:
        if key.endswith("lora_A.weight"):  # sign(w) sqrt|w| A
            expected = math.sqrt(0.7) * raw[0][key] - math.sqrt(0.4) * raw[1][key]
        else:  # sqrt|w| B
            expected = math.sqrt(0.7) * raw[0][key] + math.sqrt(0.4) * raw[1][key]
        torch.testing.assert_close(merged[key], expected, msg=key)
    deltas, exact = merged_deltas(out), weighted_sum(inputs, weights)
    error = math.sqrt(sum((deltas[k] - exact[k]).square().sum() for k in exact))
    assert error > 0.3 * math.sqrt(sum(exact[k].square().sum() for k in exact))  # cross terms B_i A_j


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("cat", {}),
        ("linear", {}),
        ("ties", {"density": 0.5}),
        ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.4}),
        ("svd", {}),
        ("svd", {"rank": 2}),
    ],
)
def test_matches_peft_add_weighted_adapter(method, options, tmp_path):
    """The same factors merged by peft's own `add_weighted_adapter` on a one-layer peft model."""
    generator = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(3, 6, generator=generator), torch.randn(5, 3, generator=generator)) for _ in range(3)]
    weights = [0.7, -0.4, 1.3]
    paths = [
        small_lora(tmp_path / f"{i}.safetensors", {LAYER: (a.tolist(), b.tolist())}) for i, (a, b) in enumerate(inputs)
    ]
    down, up = factors(merge_loras(paths, weights, tmp_path / "m.safetensors", method, **options))

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(6, 5, bias=False)

    config = LoraConfig(r=3, lora_alpha=3, target_modules=["to_q"])  # scaling 1, as our baked factors
    model = get_peft_model(OneLayer(), config, adapter_name="a0")
    for i in (1, 2):
        model.add_adapter(f"a{i}", config)
    layer = model.base_model.model.to_q
    with torch.no_grad():
        for i, (a, b) in enumerate(inputs):
            layer.lora_A[f"a{i}"].weight.copy_(a)
            layer.lora_B[f"a{i}"].weight.copy_(b)
    peft_options = {"svd_rank": options["rank"]} if "rank" in options else options
    model.add_weighted_adapter(["a0", "a1", "a2"], weights, "merged", combination_type=method, **peft_options)
    peft_down, peft_up = layer.lora_A["merged"].weight.detach(), layer.lora_B["merged"].weight.detach()
    assert down.shape == peft_down.shape and up.shape == peft_up.shape
    if method == "svd":  # singular vectors are unique up to sign: compare what the layer computes
        torch.testing.assert_close(up @ down, peft_up @ peft_down, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(down, peft_down)
        torch.testing.assert_close(up, peft_up)


# Hand-checked: weights 1 and 4, so A and B get sqrt weights 1 and 2. At density 0.5 magnitude pruning keeps
# the 3 largest of each 6 entries.
A1 = [[1, -2, 3], [-4, 5, -6]]  # keeps -4, 5, -6
A2 = [[6, 0.5, -1], [0.1, 2.5, 3]]  # keeps 6, 2.5, 3
B1 = [[1, 0.5], [-3, 2], [0.25, -1.5]]  # keeps -3, 2, -1.5
B2 = [[-2, 1], [0.5, 0], [4, -0.25]]  # keeps -2, 1, 4


@pytest.fixture()
def hand_files(tmp_path):
    return [
        small_lora(tmp_path / "1.safetensors", {LAYER: (A1, B1)}),
        small_lora(tmp_path / "2.safetensors", {LAYER: (A2, B2)}),
    ]


def test_magnitude_prune_keeps_the_largest_entries_then_sums(hand_files, tmp_path):
    down, up = factors(merge_loras(hand_files, [1, 4], tmp_path / "m.safetensors", "magnitude_prune", density=0.5))
    # [[0,0,0],[-4,5,-6]] + 2 [[6,0,0],[0,2.5,3]];  [[0,0],[-3,2],[0,-1.5]] + 2 [[-2,1],[0,0],[4,0]]
    torch.testing.assert_close(down, torch.tensor([[12.0, 0, 0], [-4, 10, 0]]))
    torch.testing.assert_close(up, torch.tensor([[-4.0, 2], [-3, 2], [8, -1.5]]))


@pytest.mark.parametrize(
    ("sign_method", "expected_down"),
    [
        # signs elected by the pruned values' sum: [1,2] is -6 + 3 < 0, so 2 * 3 is dropped
        ("total", [[12.0, 0, 0], [-4, 5, -6]]),
        # by the count of signs: [1,2] is one - and one +, a tie, elected +, so -6 is dropped
        ("frequency", [[12.0, 0, 0], [-4, 5, 6]]),
    ],
)
def test_ties_elects_a_sign_per_entry_and_averages_the_agreeing_values(
    sign_method, expected_down, hand_files, tmp_path
):
    out = merge_loras(
        hand_files, [1, 4], tmp_path / "m.safetensors", "ties", density=0.5, majority_sign_method=sign_method
    )
    down, up = factors(out)
    # [1,1]: 5 and 2 * 2.5 agree, their mean 5 (a sum would give 10); [0,0] and [1,0] are kept alone
    torch.testing.assert_close(down, torch.tensor(expected_down))
    torch.testing.assert_close(up, torch.tensor([[-4.0, 2], [-3, 2], [8, -1.5]]))  # B's kept entries never disagree


def dare_files(tmp_path):
    """Constant factors 1 and 10, so each merged entry shows which inputs' entries survived."""
    ones_a, ones_b = torch.ones(8, 16), torch.ones(12, 8)
    return [
        small_lora(tmp_path / "1.safetensors", {LAYER: (ones_a.tolist(), ones_b.tolist())}),
        small_lora(tmp_path / "2.safetensors", {LAYER: ((10 * ones_a).tolist(), (10 * ones_b).tolist())}),
    ]


@pytest.mark.parametrize(
    ("method", "first_only", "second_only", "both"),
    [
        ("dare_linear", 2.0, 40.0, 42.0),  # kept entries rescaled by 1/density: 1 / 0.5 and 2 * 10 / 0.5, summed
        ("dare_ties", 2.0, 40.0, 21.0),  # all signs agree: the mean of the kept ones
    ],
)
def test_dare_drops_random_entries_and_rescales_the_kept_ones(method, first_only, second_only, both, tmp_path):
    out = merge_loras(dare_files(tmp_path), [1, 4], tmp_path / "m.safetensors", method, density=0.5, seed=3)
    for factor in factors(out):
        values = set(factor.flatten().tolist())
        assert values == {0.0, first_only, second_only, both}, values  # every case occurs, nothing else
        kept_first = ((factor == first_only) | (factor == both)).float().mean().item()
        assert 0.3 < kept_first < 0.7  # each entry of the first input kept with probability 0.5


def test_dare_is_peft_dare_linear_seeded_and_repeats_exactly_with_the_same_seed(tmp_path):
    paths = dare_files(tmp_path)
    first = factors(merge_loras(paths, [1, 4], tmp_path / "a.safetensors", "dare_linear", density=0.5, seed=11))
    again = factors(merge_loras(paths, [1, 4], tmp_path / "b.safetensors", "dare_linear", density=0.5, seed=11))
    other = factors(merge_loras(paths, [1, 4], tmp_path / "c.safetensors", "dare_linear", density=0.5, seed=12))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(11)  # as add_weighted_adapter: A's first, then B's, weights sqrt(1) and sqrt(4)
    expected_down = dare_linear([torch.ones(8, 16), 10 * torch.ones(8, 16)], torch.tensor([1.0, 2.0]), 0.5)
    expected_up = dare_linear([torch.ones(12, 8), 10 * torch.ones(12, 8)], torch.tensor([1.0, 2.0]), 0.5)
    torch.testing.assert_close(first[0], expected_down)
    torch.testing.assert_close(first[1], expected_up)


def test_a_layer_in_one_input_only_merges_with_the_others_at_weight_zero(tmp_path):
    a = small_lora(tmp_path / "a.safetensors", {LAYER: (A1, B1), OTHER_LAYER: ([[1, 2, 3]], [[1], [-1], [2]])})
    b = small_lora(tmp_path / "b.safetensors", {LAYER: (A2, B2)})
    down, up = factors(merge_loras([a, b], [4, 1], tmp_path / "m.safetensors", "linear"), OTHER_LAYER)
    torch.testing.assert_close(down, torch.tensor([[2.0, 4, 6]]))  # sqrt(4) A
    torch.testing.assert_close(up, torch.tensor([[2.0], [-2], [4]]))  # sqrt(4) B


def test_methods_that_mix_factors_refuse_different_ranks_and_point_to_cat_or_svd(tmp_path):
    a = small_lora(tmp_path / "a.safetensors", {LAYER: (A1, B1)})  # rank 2
    b = small_lora(tmp_path / "b.safetensors", {LAYER: ([[1, 0, 0]], [[1], [2], [3]])})  # rank 1
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    for method, options in (("linear", {}), ("ties", {"density": 0.5})):
        with pytest.raises(StudioError, match="rank 1 but 2 .*use cat or svd") as error:
            merge_loras([a, b], [1, 1], out, method, **options)
        assert str(a) in str(error.value) and str(b) in str(error.value)
    assert list(out.parent.iterdir()) == []
    exact = merged_deltas(merge_loras([a, b], [1, 1], tmp_path / "cat.safetensors"))[LAYER]
    full_svd = merged_deltas(merge_loras([a, b], [1, 1], tmp_path / "svd.safetensors", "svd", rank=3))[LAYER]
    torch.testing.assert_close(full_svd, exact, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# svd


def test_svd_is_the_best_rank_k_approximation_and_exact_at_full_rank(files, tmp_path):
    inputs, weights = [files["sd1"]["kohya"], files["sd1"]["diffusers"]], [0.7, -0.4]
    exact = weighted_sum(inputs, weights)
    norm = math.sqrt(sum(delta.square().sum() for delta in exact.values()))
    errors = []
    for rank in (1, 2, 4, 8):  # 8 = 4 + 4, the largest sum of ranks
        out = merge_loras([b.path for b in inputs], weights, tmp_path / f"svd{rank}.safetensors", "svd", rank=rank)
        merged = merged_deltas(out)
        errors.append(math.sqrt(sum((merged[k] - exact[k]).square().sum() for k in exact)))
        # Eckart-Young: the error of the best rank-k approximation is the norm of the singular values beyond k
        best = math.sqrt(sum(torch.linalg.svdvals(exact[k])[rank:].square().sum() for k in exact))
        assert errors[-1] == pytest.approx(best, rel=1e-3, abs=1e-5 * norm)
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-5 * norm


def test_svd_rank_defaults_to_the_largest_input_rank_of_each_layer(files, tmp_path):
    inputs = [files["sd1"]["kohya"].path, files["sd1"]["diffusers"].path]
    out = merge_loras(inputs, [1, 1], tmp_path / "svd.safetensors", "svd")
    ranks = {}
    for path in inputs:
        for m in read_lora(path).modules:
            ranks[(m.component, m.module)] = max(ranks.get((m.component, m.module), 0), m.converted_rank)
    merged = {(m.component, m.module): m.converted_rank for m in read_lora(out).modules}
    assert merged == ranks and len(set(ranks.values())) > 1


def test_svd_clamp_clips_the_factors_at_the_quantile_of_their_entries(hand_files, tmp_path):
    free_down, free_up = factors(merge_loras(hand_files, [1, 4], tmp_path / "a.safetensors", "svd", rank=2))
    down, up = factors(merge_loras(hand_files, [1, 4], tmp_path / "b.safetensors", "svd", rank=2, clamp=0.7))
    high = torch.quantile(torch.cat([free_up.flatten(), free_down.flatten()]), 0.7)
    torch.testing.assert_close(down, free_down.clamp(-high, high))
    torch.testing.assert_close(up, free_up.clamp(-high, high))
    assert not torch.equal(up, free_up) or not torch.equal(down, free_down)


# ---------------------------------------------------------------------------------------------------
# The merged file


def base_weights(pipe, keys):
    return {
        key: getattr(pipe, key.split(".")[0]).get_submodule(key.split(".", 1)[1]).weight.detach().clone()
        for key in keys
    }


def assert_layers_compute(pipe, originals, deltas):
    """Each adapted layer of `pipe` computes with its original weight + delta."""
    for key, delta in deltas.items():
        component, module = key.split(".", 1)
        layer = getattr(pipe, component).get_submodule(module)
        x = layer_input(layer)
        weight = originals[key] + delta.reshape(originals[key].shape).float()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_output(layer, x, weight), rtol=1e-4, atol=1e-5, msg=key)


def test_merged_file_loads_in_plain_diffusers(files, tmp_path):
    inputs, weights = [files["sd1"]["kohya"], files["sd1"]["diffusers"]], [0.6, 0.9]
    out = merge_loras([b.path for b in inputs], weights, tmp_path / "m.safetensors")
    expected = weighted_sum(inputs, weights)
    pipe = tiny_sd_pipeline(0)
    originals = base_weights(pipe, expected)
    pipe.load_lora_weights(str(out))
    assert_layers_compute(pipe, originals, expected)


def test_kohya_named_merge_loads_through_studio(files, tmp_path):
    """(Plain diffusers' kohya loader mis-scales files whose ranks differ per module: see lora_io.)"""
    inputs, weights = [files["sdxl"]["kohya"], files["sdxl"]["diffusers"]], [0.6, 0.9]
    out = merge_loras([b.path for b in inputs], weights, tmp_path / "m.safetensors", naming="kohya")
    assert read_lora(out).naming == "kohya" and load_file(str(out)).keys() >= {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
    }
    expected = weighted_sum(inputs, weights)
    studio = Studio.from_base("tiny-sdxl")
    originals = base_weights(studio.pipeline, expected)
    studio.load_adapter(out, name="merged")
    assert_layers_compute(studio.pipeline, originals, expected)


def test_metadata_records_the_recipe_and_the_union_of_trigger_words(pipes, tmp_path):
    a = diffusers_lora(
        pipes["sd1"], tmp_path / "a.safetensors", "sd1", distinct=True, metadata={"studio.trigger_words": "sks dog"}
    )
    b = diffusers_lora(pipes["sd1"], tmp_path / "b.safetensors", "sd1", seed=2, distinct=True,
                       metadata={"modelspec.trigger_phrase": "ohwx, sks dog"})  # fmt: skip
    out = merge_loras([a.path, b.path], [0.6, 0.4], tmp_path / "m.safetensors", "ties", density=0.5)
    report = inspect(out)
    assert report.trigger_words == ["sks dog", "ohwx"]
    assert report.family == "sd1"
    assert json.loads(report.other_metadata["studio.merge"]) == {
        "method": "ties",
        "density": 0.5,
        "majority_sign_method": "total",
        "sources": [
            {"file": "a.safetensors", "sha256": hashlib.sha256(a.path.read_bytes()).hexdigest(), "weight": 0.6},
            {"file": "b.safetensors", "sha256": hashlib.sha256(b.path.read_bytes()).hexdigest(), "weight": 0.4},
        ],
    }


def test_merging_holds_one_layer_of_each_input_at_a_time(pipes, files, monkeypatch, tmp_path):
    inputs = [files["sd1"]["kohya"].path, files["sd1"]["diffusers"].path,
              loha_lora(pipes["sd1"], tmp_path / "loha.safetensors", "sd1", distinct=True).path]  # fmt: skip
    modules = sum(inspect(path).num_modules for path in inputs)
    alive, counts = set(), {}
    original = LoraReader.factors

    def counting_factors(self, module):
        loaded = original(self, module)
        for tensor in loaded:
            counts["loaded"] += 1
            alive.add(id(tensor))
            weakref.finalize(tensor, alive.discard, id(tensor))
        counts["most_alive"] = max(counts["most_alive"], len(alive))
        return loaded

    monkeypatch.setattr(LoraReader, "factors", counting_factors)
    for method in ("cat", "svd"):
        counts.update(loaded=0, most_alive=0)
        merge_loras(inputs, [1, 1, 1], tmp_path / f"{method}.safetensors", method)
        assert counts["loaded"] == 2 * modules  # every module read once, through the streaming reader
        assert counts["most_alive"] <= 2 * 3 < modules  # at most one layer's A and B of each input at once


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def bad_inputs(pipes, files, tmp_path):
    sd1, sdxl = files["sd1"]["kohya"].path, files["sdxl"]["kohya"].path
    other = files["sd1"]["diffusers"].path
    dora = kohya_lora(pipes["sd1"], tmp_path / "dora.safetensors", "sd1", dora=True, distinct=True).path
    return {
        "one file": (([sd1], [1.0]), {}, "at least two"),
        "weights count": (([sd1, other], [1.0]), {}, "1 weights for 2 LoRA files"),
        "mixed families": (
            ([sd1, sdxl], [1, 1]),
            {},
            f"{sdxl} is a Stable Diffusion XL LoRA \\(sdxl\\) but {sd1} is for",
        ),
        "density 0": (([sd1, other], [1, 1]), {"method": "ties", "density": 0.0}, "density must be in \\(0, 1\\]"),
        "density 1.5": (([sd1, other], [1, 1]), {"method": "dare_ties", "density": 1.5}, "density must be in"),
        "no density": (([sd1, other], [1, 1]), {"method": "magnitude_prune"}, "needs a density"),
        "unknown method": (([sd1, other], [1, 1]), {"method": "average"}, "unknown merge method 'average'"),
        "dora": (([sd1, dora], [1, 1]), {}, f"{dora}: module .* is DoRA.*without the base model's weights"),
        "missing file": (([sd1, tmp_path / "nope.safetensors"], [1, 1]), {}, "nope.safetensors: no such file"),
        "not a number": (([sd1, other], [1, float("nan")]), {}, "not a finite number"),
    }


BAD_CASES = ["one file", "weights count", "mixed families", "density 0", "density 1.5", "no density",
             "unknown method", "dora", "missing file", "not a number"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, pipes, files, tmp_path):
    (paths, weights), options, message = bad_inputs(pipes, files, tmp_path)[case]
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(StudioError, match=message) as error:
        merge_loras(paths, weights, folder / "merged.safetensors", **options)
    assert "\n" not in str(error.value)
    assert list(folder.iterdir()) == []  # no output, no temporary file


def test_output_must_be_safetensors(files, tmp_path):
    with pytest.raises(StudioError, match="merged.ckpt: merged LoRAs are written as .safetensors only"):
        merge_loras([files["sd1"]["kohya"].path, files["sd1"]["diffusers"].path], [1, 1], tmp_path / "merged.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_methods_are_the_seven_of_peft_with_cat_first():
    assert MERGE_METHODS == ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_merges_with_weights_one_by_default_and_prints_a_summary(capsys, files, tmp_path):
    inputs = [files["sd1"]["kohya"], files["sd1"]["diffusers"]]
    out = tmp_path / "m.safetensors"
    status = main(["merge", str(inputs[0].path), str(inputs[1].path), "-o", str(out)])
    printed, err = capsys.readouterr()
    assert (status, err) == (0, "")
    assert printed.startswith(f"merged 2 LoRAs with cat: {len(read_lora(out).modules)} modules, rank ")
    assert printed.strip().endswith(f"wrote {out}")
    merged, expected = merged_deltas(out), weighted_sum(inputs, [1, 1])
    for key, delta in expected.items():
        torch.testing.assert_close(merged[key], delta, rtol=1e-5, atol=1e-6, msg=key)


def test_cli_options_reach_the_merge(capsys, hand_files, tmp_path):
    out = tmp_path / "m.safetensors"
    argv = ["merge", *map(str, hand_files), "--weights", "1", "4", "--method", "ties", "--density", "0.5",
            "--majority-sign", "frequency", "--to", "kohya", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "merged 2 LoRAs with ties: 1 modules, rank 2" in capsys.readouterr().out
    down, _ = factors(out)
    torch.testing.assert_close(down, torch.tensor([[12.0, 0, 0], [-4, 5, 6]]))
    assert read_lora(out).naming == "kohya"


@pytest.mark.parametrize(
    "extra", [["--weights", "1"], ["--method", "svd", "--density", "0.5"], ["--method", "ties", "--density", "0"]]
)
def test_cli_errors_are_one_line_and_exit_2(extra, capsys, hand_files, tmp_path):
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    assert main(["merge", *map(str, hand_files), *extra, "-o", str(out)]) == 2
    printed, err = capsys.readouterr()
    assert printed == "" and err.startswith("error: ") and err.count("\n") == 1
    assert list(out.parent.iterdir()) == []
