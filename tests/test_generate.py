"""`studio.generate`: reproducible renders, A1111 prompt tags and metadata, sweeps and grids, re-runs,
several processes, and one-line errors before anything is written. All on the tiny SD pipeline."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_factories import diffusers_lora
from PIL import Image
from ports import free_port

from studio.a1111 import LoraTag, format_infotext, format_lora_tag, parse_infotext, parse_lora_hashes, split_lora_tags
from studio.adapters import Studio
from studio.checkpoint import ldm_state_dict, save_single_file
from studio.errors import StudioError
from studio.generate import main, run_recipe
from studio.pngmeta import read_png_metadata, save_png
from studio.recipe import Axis, Job, Recipe, Sweep, load_recipe
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parent.parent
FAST = dict(steps=2, width=16, height=16)
FAST_FLAGS = ["--base", "tiny-sd", "--steps", "2", "--width", "16", "--height", "16"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run several times faster on one thread (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """Three diffusers-format LoRAs, a, b and c, for the tiny SD pipeline."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = tiny_sd_pipeline()
    for seed, name in enumerate("abc", start=1):
        diffusers_lora(pipe, folder / f"{name}.safetensors", "sd1", seed=seed)
    return folder


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def recipe(lora_dir, out, *jobs, **kwargs) -> Recipe:
    return Recipe(jobs=list(jobs), base="tiny-sd", out=out, lora_dir=lora_dir, **kwargs)


def test_same_seed_and_blend_give_identical_pixels_and_match_the_studio(lora_dir, tmp_path):
    job = Job(prompt="a red circle", name="pair", seeds=[3], loras={"a": 0.7, "b": {"unet": 0.4, "text_encoder": 1.0}}, **FAST)
    first = run_recipe(recipe(lora_dir, tmp_path / "one", job))
    second = run_recipe(recipe(lora_dir, tmp_path / "two", job))
    assert [p.name for p in first] == [p.name for p in second] == ["pair-s3.png"]
    assert np.array_equal(pixels(first[0]), pixels(second[0]))

    studio = Studio.from_base("tiny-sd")
    studio.load_adapter(lora_dir / "a.safetensors", name="a")
    studio.load_adapter(lora_dir / "b.safetensors", name="b")
    studio.set_adapters({"a": 0.7, "b": {"unet": 0.4, "text_encoder": 1.0}})
    direct = np.asarray(studio.generate("a red circle", seed=3, **FAST)[0])
    assert np.array_equal(pixels(first[0]), direct)
    studio.disable_lora()
    assert not np.array_equal(direct, np.asarray(studio.generate("a red circle", seed=3, **FAST)[0]))


def test_prompt_tag_equals_lora_flag(lora_dir, tmp_path, capsys):
    tagged = ["--lora-dir", str(lora_dir), "--prompt", "a red circle <lora:a:0.5>", "--out", str(tmp_path / "tag")]
    flagged = ["--lora-dir", str(lora_dir), "--lora", "a:0.5", "--prompt", "a red circle", "--out", str(tmp_path / "flag")]
    by_path = ["--lora", f"{lora_dir / 'a.safetensors'}:0.5", "--prompt", "a red circle", "--out", str(tmp_path / "path")]
    full = ["--lora-dir", str(lora_dir), "--prompt", "a red circle <lora:a:1>", "--out", str(tmp_path / "full")]
    for argv in (tagged, flagged, by_path, full):
        assert main(FAST_FLAGS + argv) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert [p.name for p in written] == ["a-red-circle-s0.png"] * 4
    tag_image, flag_image, path_image, full_image = (pixels(p) for p in written)
    assert np.array_equal(tag_image, flag_image) and np.array_equal(tag_image, path_image)
    assert not np.array_equal(tag_image, full_image)
    assert read_png_metadata(written[0]) == read_png_metadata(written[1])


def test_png_metadata_parses_back_to_the_settings(lora_dir, tmp_path, capsys):
    argv = FAST_FLAGS + ["--lora-dir", str(lora_dir), "--lora", "b:0.25", "--seed", "7", "--num-images", "2",
                         "--guidance", "6.5", "--negative-prompt", "blurry, dark",
                         "--prompt", "a red circle <lora:a:0.5:0.75>", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    paths = [Path(line) for line in capsys.readouterr().out.split()]
    assert [p.name for p in paths] == ["a-red-circle-s7.png", "a-red-circle-s8.png"]
    parameters, record = read_png_metadata(paths[1])
    info = parse_infotext(parameters)
    assert info["Prompt"] == "a red circle <lora:b:0.25> <lora:a:0.5:0.75>"
    assert info["Negative prompt"] == "blurry, dark"
    assert (info["Steps"], info["CFG scale"], info["Seed"], info["Size"], info["Model"]) == ("2", "6.5", "8", "16x16", "tiny-sd")
    assert info["Sampler"] == type(tiny_sd_pipeline().scheduler).__name__
    assert parse_lora_hashes(info["Lora hashes"]) == {name: a1111_short_hash(lora_dir / f"{name}.safetensors") for name in "ba"}
    assert record["prompt"] == "a red circle" and record["seed"] == 8 and record["guidance"] == 6.5
    assert [(a["name"], a["weight"]) for a in record["adapters"]] == [
        ("b", 0.25),
        ("a", {"unet": 0.75, "text_encoder": 0.5}),
    ]
    assert record["adapters"][1]["sha256"] == hashlib.sha256((lora_dir / "a.safetensors").read_bytes()).hexdigest()


def a1111_short_hash(path: Path) -> str:
    """A1111's `Lora hashes` entry: sha256 of a safetensors file's bytes after its JSON header, 12 digits."""
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]


def test_from_image_reproduces_bit_identically(lora_dir, tmp_path, capsys):
    jobs = [
        Job(prompt="a red circle", name="blocks", seeds=[5], loras={"a": {"down": 0.2, "mid": 1.0, "up": 0.6}, "c": 0.8}, **FAST),
        Job(prompt="a sks shape", name="fused", seeds=[6], loras={"b": -0.5}, fuse=True, negative_prompt="dark", **FAST),
        Job(prompt="a red circle", name="plain", seeds=[9], **FAST),
        Job(prompt="a red circle", name="batch", seeds=[11, 12, 13], loras={"c": 0.5}, **FAST),
    ]
    originals = run_recipe(recipe(lora_dir, tmp_path / "run", *jobs, batch_size=2))
    assert len(originals) == 6
    for original in originals:
        assert main(["--from-image", str(original), "--out", str(tmp_path / "again")]) == 0
        again = Path(capsys.readouterr().out.split()[-1])
        assert again == tmp_path / "again" / original.name
        assert np.array_equal(pixels(again), pixels(original))
        assert read_png_metadata(again) == read_png_metadata(original)
    _, fused_record = read_png_metadata(tmp_path / "run" / "fused-s6.png")
    assert fused_record["fused"] is True and [a["name"] for a in fused_record["adapters"]] == ["b"]
    batches = [read_png_metadata(tmp_path / "run" / f"batch-s{seed}.png")[1]["batch"] for seed in (11, 12, 13)]
    assert batches == [{"first_seed": 11, "size": 2}, {"first_seed": 11, "size": 2}, {"first_seed": 13, "size": 1}]


def test_from_image_refuses_a_changed_adapter_file(lora_dir, tmp_path, capsys):
    own = tmp_path / "loras"
    own.mkdir()
    (own / "a.safetensors").write_bytes((lora_dir / "a.safetensors").read_bytes())
    [image] = run_recipe(recipe(own, tmp_path / "run", Job(prompt="a red circle", loras={"a": 1.0}, **FAST)))
    (own / "a.safetensors").write_bytes((lora_dir / "b.safetensors").read_bytes())
    assert main(["--from-image", str(image), "--out", str(tmp_path / "again")]) == 2
    assert "changed since the image was rendered" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_from_image_checks_an_edited_record_as_a_recipe_job(lora_dir, tmp_path, capsys):
    [image] = run_recipe(recipe(lora_dir, tmp_path / "run", Job(prompt="a red circle", **FAST)))
    parameters, record = read_png_metadata(image)
    for key, value, message in (("steps", "abc", "steps must be an integer from 1 to 1000, not 'abc'"),
                                ("seed", -5, "seeds must be integers"),
                                ("guidance", float("nan"), "guidance must be a finite number >= 0, not nan")):  # fmt: skip
        edited = tmp_path / f"edited-{key}.png"
        save_png(edited, Image.open(image), parameters, {**record, key: value})
        assert main(["--from-image", str(edited), "--out", str(tmp_path / "again")]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after the first run's own output
        assert error.startswith(f"error: {edited}: its lora-studio record: ") and message in error
    assert not (tmp_path / "again").exists()


def test_weight_sweep_by_seed_writes_labelled_grid_of_its_cells(lora_dir, tmp_path):
    sweep = Sweep(x=Axis("weight", [0, 0.5, 1.0], adapter="a"), y=Axis("seed", [1, 2]))
    job = Job(prompt="a red circle", name="w", loras={"b": 0.3}, sweep=sweep, **FAST)
    plain = Job(prompt="a red circle", name="plain", seeds=[1, 2], loras={"b": 0.3}, **FAST)
    written = run_recipe(recipe(lora_dir, tmp_path, job, plain))
    names = [f"w-a-{w}-s{s}.png" for s in (1, 2) for w in ("0", "0.5", "1")]
    assert sorted(p.name for p in written) == sorted(names + ["plain-s1.png", "plain-s2.png", "w-grid.png"])
    for seed in (1, 2):  # a at weight 0 is the job without a
        assert np.array_equal(pixels(tmp_path / f"w-a-0-s{seed}.png"), pixels(tmp_path / f"plain-s{seed}.png"))
    grid = pixels(tmp_path / "w-grid.png")
    cells = [[pixels(tmp_path / f"w-a-{w}-s{s}.png") for w in ("0", "0.5", "1")] for s in (1, 2)]
    check_grid_layout(grid, cells, scale=1, row_labels=True)


def test_adapter_set_sweep_is_base_each_and_blend(lora_dir, tmp_path):
    sweep = Sweep(x=Axis("adapters", ["a", "b"]), scale=2)
    job = Job(prompt="a red circle", name="set", seeds=[4], loras={"a": 0.9, "c": 1.0}, sweep=sweep, **FAST)
    run_recipe(recipe(lora_dir, tmp_path, job))
    cells = [pixels(tmp_path / f"set-{slug}-s4.png") for slug in ("base", "a", "b", "blend")]
    studio = Studio.from_base("tiny-sd")
    for name in "ab":
        studio.load_adapter(lora_dir / f"{name}.safetensors", name=name)
    expected = [
        studio.make_blend({}, enabled=False),
        studio.make_blend({"a": 0.9}),
        studio.make_blend({"b": 1.0}),
        studio.make_blend({"a": 0.9, "b": 1.0}),
    ]
    for cell, blend in zip(cells, expected, strict=True):
        assert np.array_equal(cell, np.asarray(studio.generate("a red circle", seed=4, blend=blend, **FAST)[0]))
    enlarged = [[cell.repeat(2, axis=0).repeat(2, axis=1) for cell in cells]]
    check_grid_layout(pixels(tmp_path / "set-grid.png"), enlarged, scale=2, row_labels=False)


def check_grid_layout(grid: np.ndarray, cells: list[list[np.ndarray]], scale: int, row_labels: bool) -> None:
    """Each cell appears in the grid exactly, in row/column order, below a band of label ink over every
    column (and, with row labels, left of a band of label ink)."""
    size = cells[0][0].shape[0]
    positions = [[find_block(grid, cell) for cell in row] for row in cells]
    for row in positions:
        assert [x for _, x in row] == sorted(x for _, x in row) and len({y for y, _ in row}) == 1
    assert [row[0][0] for row in positions] == sorted(row[0][0] for row in positions)
    top, left = positions[0][0]
    assert top >= 8 and (left >= 8) == row_labels
    for _, x in positions[0]:
        assert (grid[:top, x : x + size] < 128).any(), "no label above a column"
    for y, _ in (row[0] for row in positions):
        assert not row_labels or (grid[y : y + size, :left] < 128).any()
    columns, rows = len(cells[0]), len(cells)
    assert grid.shape[1] >= left + columns * size and grid.shape[0] == top + rows * size
    assert size == 16 * scale


def find_block(grid: np.ndarray, block: np.ndarray) -> tuple[int, int]:
    h, w = block.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(grid, block.shape)[..., 0, :, :, :]
    matches = np.argwhere((windows == block).all(axis=(2, 3, 4)))
    assert len(matches) == 1, f"block found {len(matches)} times"
    return int(matches[0][0]), int(matches[0][1])


def test_rerun_skips_written_images_and_refuses_stale_ones(lora_dir, tmp_path):
    jobs = [Job(prompt="a red circle", name="j", seeds=[1, 2, 3], loras={"a": 0.5}, **FAST)]
    first = run_recipe(recipe(lora_dir, tmp_path, *jobs))
    assert len(first) == 3
    (tmp_path / "j-s2.png").unlink()
    before = (tmp_path / "j-s1.png").stat().st_mtime_ns
    assert run_recipe(recipe(lora_dir, tmp_path, *jobs)) == [tmp_path / "j-s2.png"]
    assert (tmp_path / "j-s1.png").stat().st_mtime_ns == before
    edited = [Job(prompt="a red circle", name="j", seeds=[1, 2, 3], loras={"a": 0.6}, **FAST)]
    with pytest.raises(StudioError, match="j-s1.png: already exists with other settings"):
        run_recipe(recipe(lora_dir, tmp_path, *edited))
    assert (tmp_path / "j-s1.png").stat().st_mtime_ns == before
    assert len(run_recipe(recipe(lora_dir, tmp_path, *edited), overwrite=True)) == 3


def test_two_processes_write_each_image_exactly_once(lora_dir, tmp_path):
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(f"""
base = "tiny-sd"
lora_dir = "{lora_dir}"
[defaults]
steps = 2
width = 16
height = 16
[[jobs]]
name = "plain"
prompt = "a red circle <lora:c:0.5>"
seeds = [1, 2, 3]
[[jobs]]
name = "sweep"
prompt = "a red circle"
loras = {{ a = 0.8 }}
sweep = {{ x = {{ kind = "adapters", values = ["a", "b"] }}, y = {{ kind = "seed", values = [1, 2] }} }}
""")
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "-m", "studio.generate", "--recipe", str(recipe_file), "--out", str(tmp_path / "out")]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = [line for line in result.stdout.split("\n") if line.endswith(".png")]
    cells = [f"sweep-{slug}-s{seed}.png" for seed in (1, 2) for slug in ("base", "a", "b", "blend")]
    expected = ["plain-s1.png", "plain-s2.png", "plain-s3.png", *cells, "sweep-grid.png"]
    assert sorted(Path(line).name for line in written) == sorted(expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "a red circle <lora:zzz:0.5>"], "unknown adapter 'zzz': no zzz.safetensors under"),
        (["--prompt", "a red circle", "--lora", "missing.safetensors"], "--lora missing.safetensors: no such file"),
        (["--prompt", "a red circle", "--width", "60"], "width must be a positive multiple of 8, not 60"),
        (["--prompt", "a red circle", "--height", "0"], "height must be a positive multiple of 8, not 0"),
        (["--prompt", "a red circle <lora:a:x>"], "has a weight that is not a number"),
        (["--prompt", "a red circle <lora:a:0.5>", "--lora", "a:0.2"], "adapter 'a' is weighted twice"),
        (["--prompt", "a red circle", "--lora", "a:nan"], "loras.a must be a number or a table of numbers, not nan"),
        (["--prompt", "a red circle <lora:a:inf>"], "adapter 'a': weight inf is not a finite number"),
        (["--prompt", "a red circle <lora:a:1:nan>"], "adapter 'a': weight of unet must be a finite number, not nan"),
        (["--prompt", "a red circle", "--guidance", "nan"], "guidance must be a finite number >= 0, not nan"),
    ],
)
def test_bad_command_lines_fail_in_one_line_before_writing(lora_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(FAST_FLAGS + ["--lora-dir", str(lora_dir), "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not out.exists()


def test_lora_hub_ids_resolve_from_the_local_cache_as_a_repo_or_one_of_its_files(lora_dir, tmp_path, monkeypatch):
    """The standard cache layout (models--owner--name/snapshots/<rev>): `owner/name` holding one LoRA, and
    `owner/name/FILE.safetensors`, render exactly what the local file renders."""
    revision = "0" * 40
    for repo, files in (("one", ["a.safetensors"]), ("two", ["a.safetensors", "b.safetensors"])):
        cached = tmp_path / "cache" / f"models--studio-test--{repo}"
        (cached / "refs").mkdir(parents=True)
        (cached / "refs" / "main").write_text(revision)
        (cached / "snapshots" / revision).mkdir(parents=True)
        for name in files:
            (cached / "snapshots" / revision / name).write_bytes((lora_dir / name).read_bytes())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    rendered = {}
    for source in (str(lora_dir / "a.safetensors"), "studio-test/one", "studio-test/two/a.safetensors"):
        out = tmp_path / source.replace("/", "_")
        assert main(FAST_FLAGS + ["--prompt", "a red circle", "--seed", "1", "--lora", f"{source}:0.7",
                                  "--out", str(out)]) == 0  # fmt: skip
        [png] = out.glob("*.png")
        rendered[source] = np.asarray(Image.open(png))
    first, *others = rendered.values()
    assert all(np.array_equal(first, other) for other in others)
    base = tmp_path / "base"
    assert main(FAST_FLAGS + ["--prompt", "a red circle", "--seed", "1", "--out", str(base)]) == 0
    assert not np.array_equal(first, np.asarray(Image.open(next(base.glob("*.png")))))  # the LoRA does change it


def test_an_output_folder_that_cannot_be_made_fails_in_one_line_before_rendering(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("studio.generate.Studio.from_base", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "a-file").write_text("mine")
    assert main(FAST_FLAGS + ["--prompt", "a red circle", "--out", str(tmp_path / "a-file" / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"a-file/out: cannot create the output folder: {tmp_path / 'a-file'} is a file")


def test_a_prompt_in_other_scripts_names_its_images_in_ascii(tmp_path):
    assert main(FAST_FLAGS + ["--prompt", "猫 ünïcödé 🐱", "--out", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["unicode-s0.png"]


def test_family_mismatch_fails_before_writing(tmp_path, capsys):
    xl_lora = tmp_path / "xl.safetensors"
    diffusers_lora(tiny_sdxl_pipeline(), xl_lora, "sdxl")
    out = tmp_path / "out"
    assert main(FAST_FLAGS + ["--lora", f"{xl_lora}:0.5", "--prompt", "a red circle", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "sdxl" in err and "sd1" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("syntax.toml", 'base = "tiny-sd"\n[[jobs]]\nprompt = "a red circle\n', "not valid TOML: "),
        ("out.toml", 'out = 5\n[[jobs]]\nprompt = "x"\n', "out must be text (a path or a name), not 5"),
        ("key.toml", '[[jobs]]\nprompt = "x"\n[[jobs]]\nprompt = "y"\nstepz = 3\n', "jobs[2]: unknown key 'stepz'"),
        ("axis.toml", '[[jobs]]\nname = "s"\nprompt = "x"\nsweep = { x = { kind = "colour", values = [1] } }\n',
         "jobs[1] (s).sweep.x: kind must be one of seed, weight, adapters, not 'colour'"),
        ("seeds.yaml", "jobs:\n  - prompt: x\n    seeds: [1, 1]\n", "jobs[1]: seeds has duplicates"),
        ("size.yaml", "defaults:\n  width: 33\njobs:\n  - prompt: x\n", "jobs[1]: width must be a positive multiple of 8"),
        ("syntax.yaml", "jobs:\n  - prompt: [x\n  - seeds: 2\n", "not valid YAML: line 3, column 1"),
        ("weight.toml", '[[jobs]]\nprompt = "x"\nloras = { a = "heavy" }\n', "loras.a must be a number or a table of numbers"),
    ],
)
def test_malformed_recipes_name_the_key_or_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert main(["--recipe", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_syntax_error_line_number_is_the_toml_line(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[jobs]]\nprompt = "x"\nsteps = = 3\n')
    with pytest.raises(StudioError, match=r"at line 3"):
        load_recipe(path)


def test_example_recipe_and_its_yaml_twin_parse_to_the_same_jobs(tmp_path):
    example = load_recipe(REPO / "assets" / "recipes" / "example.toml")
    assert example.base == "demo" and len(example.jobs) >= 3
    assert {axis.kind for job in example.jobs if job.sweep for axis in job.sweep.axes} == {"seed", "weight", "adapters"}
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text(
        "base: tiny-sd\ndefaults: {steps: 3, seed: 10, num_images: 2}\n"
        "jobs:\n  - {prompt: a red circle, loras: {a: {down: 0, mid: 1, up: 0.5}}}\n  - {prompt: x, seeds: [4]}\n"
    )
    toml_path = tmp_path / "r.toml"
    toml_path.write_text(
        'base = "tiny-sd"\n[defaults]\nsteps = 3\nseed = 10\nnum_images = 2\n'
        '[[jobs]]\nprompt = "a red circle"\nloras = { a = { down = 0, mid = 1, up = 0.5 } }\n[[jobs]]\nprompt = "x"\nseeds = [4]\n'
    )
    from_yaml, from_toml = load_recipe(yaml_path), load_recipe(toml_path)
    assert from_yaml.jobs == from_toml.jobs
    assert [(job.name, job.seeds, job.steps) for job in from_yaml.jobs] == [("job1", [10, 11], 3), ("job2", [4], 3)]
    assert json.dumps(from_yaml.jobs[0].loras) == '{"a": {"down": 0, "mid": 1, "up": 0.5}}'


def test_a_jobs_num_images_counts_from_the_default_seed_and_its_seeds_replace_both(tmp_path):
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(
        'base = "tiny-sd"\n[defaults]\nseed = 7\nnum_images = 3\n'
        '[[jobs]]\nprompt = "a"\nnum_images = 2\n[[jobs]]\nprompt = "b"\nseed = 20\n'
        '[[jobs]]\nprompt = "c"\nseeds = [4, 9]\n[[jobs]]\nprompt = "d"\n'
    )
    assert [job.seeds for job in load_recipe(recipe_file).jobs] == [[7, 8], [20, 21, 22], [4, 9], [7, 8, 9]]


def test_cli_help_and_mode_errors(capsys):
    with pytest.raises(SystemExit) as exit_help:
        main(["--help"])
    assert exit_help.value.code == 0 and "--from-image" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_both:
        main(["--prompt", "x", "--recipe", "r.toml"])
    assert exit_both.value.code == 2 and "exactly one of --prompt, --recipe, --from-image" in capsys.readouterr().err


def test_lora_tags_read_and_write_like_a1111():
    text, tags = split_lora_tags("a red circle <lora:a> <lora:b:0.5> striped <lora:c:0.2:0.9> <lora:d:1:unet=0.3> <lora:e:te=0>")
    assert text == "a red circle striped"
    assert tags == [LoraTag("a", 1, 1), LoraTag("b", 0.5, 0.5), LoraTag("c", 0.2, 0.9), LoraTag("d", 1, 0.3), LoraTag("e", 0, 0)]
    assert tags[2].weight_for(["unet", "text_encoder", "text_encoder_2"]) == {"unet": 0.9, "text_encoder": 0.2, "text_encoder_2": 0.2}
    assert tags[1].weight_for(["unet", "text_encoder"]) == 0.5
    assert format_lora_tag("b", 0.5) == "<lora:b:0.5>"
    assert format_lora_tag("c", {"unet": 0.9, "text_encoder": 0.2, "text_encoder_2": 0.2}) == "<lora:c:0.2:0.9>"
    assert format_lora_tag("f", {"unet": {"down": 0, "mid": 1, "up": 1}, "text_encoder": 1.0}) is None


def test_infotext_round_trips_multiline_prompts_and_quoted_values():
    params = {"Steps": 20, "Sampler": "DPMSolverMultistepScheduler", "CFG scale": 7.0, "Seed": 3, "Lora hashes": "a: 0123456789ab, b: ba9876543210"}
    text = format_infotext("a red circle\non white", "blurry,\ndark", params)
    assert text.splitlines()[-1] == (
        'Steps: 20, Sampler: DPMSolverMultistepScheduler, CFG scale: 7, Seed: 3, Lora hashes: "a: 0123456789ab, b: ba9876543210"'
    )
    info = parse_infotext(text)
    assert (info["Prompt"], info["Negative prompt"], info["CFG scale"]) == ("a red circle\non white", "blurry,\ndark", "7")
    assert parse_lora_hashes(info["Lora hashes"]) == {"a": "0123456789ab", "b": "ba9876543210"}


def test_single_file_bases_render_with_their_config_and_pickles_only_when_allowed(tmp_path, capsys):
    original = tiny_sd_pipeline()
    original.save_pretrained(tmp_path / "config")
    checkpoint = save_single_file(original, tmp_path / "model.safetensors")
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm_state_dict(original)}, pickled)
    flags = ["--prompt", "a red circle", "--steps", "2", "--width", "16", "--height", "16", "--name", "x"]

    assert main(flags + ["--base", "tiny-sd", "--out", str(tmp_path / "direct")]) == 0
    expected = pixels(tmp_path / "direct" / "x-s0.png")
    config = ["--base-config", str(tmp_path / "config")]
    assert main(flags + ["--base", str(checkpoint), *config, "--out", str(tmp_path / "single")]) == 0
    assert np.array_equal(pixels(tmp_path / "single" / "x-s0.png"), expected)
    assert main(flags + ["--base", str(pickled), *config, "--out", str(tmp_path / "refused")]) == 2
    assert "pickles that can run code" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main(flags + ["--base", str(pickled), *config, "--allow-pickle", "--out", str(tmp_path / "pickled")]) == 0
    assert np.array_equal(pixels(tmp_path / "pickled" / "x-s0.png"), expected)
    # a re-render names the checkpoint; its config is given again, as the first render needed it
    again = ["--from-image", str(tmp_path / "single" / "x-s0.png"), "--out", str(tmp_path / "again")]
    assert main(again + config) == 0
    assert np.array_equal(pixels(tmp_path / "again" / "x-s0.png"), expected)


def test_clip_skip_is_written_as_a1111_does_and_re_renders_bit_identically(tmp_path, capsys):
    flags = ["--prompt", "a red circle", *FAST_FLAGS, "--name", "x", "--out"]
    assert main(flags + [str(tmp_path / "plain")]) == 0
    assert main(flags + [str(tmp_path / "skip"), "--clip-skip", "2"]) == 0
    plain_text, plain_record = read_png_metadata(tmp_path / "plain" / "x-s0.png")
    skip_text, skip_record = read_png_metadata(tmp_path / "skip" / "x-s0.png")
    assert "Clip skip" not in parse_infotext(plain_text) and "clip_skip" not in plain_record  # as before it existed
    assert parse_infotext(skip_text)["Clip skip"] == "2" and skip_record["clip_skip"] == 2
    assert not np.array_equal(pixels(tmp_path / "plain" / "x-s0.png"), pixels(tmp_path / "skip" / "x-s0.png"))
    capsys.readouterr()
    assert main(["--from-image", str(tmp_path / "skip" / "x-s0.png"), "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(pixels(tmp_path / "again" / "x-s0.png"), pixels(tmp_path / "skip" / "x-s0.png"))

    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text('base = "tiny-sd"\n[defaults]\nclip_skip = 2\nsteps = 2\nwidth = 16\nheight = 16\n'
                           '[[jobs]]\nname = "x"\nprompt = "a red circle"\n')  # fmt: skip
    assert main(["--recipe", str(recipe_file), "--out", str(tmp_path / "recipe")]) == 0
    assert np.array_equal(pixels(tmp_path / "recipe" / "x-s0.png"), pixels(tmp_path / "skip" / "x-s0.png"))
    assert main(flags + [str(tmp_path / "deep"), "--clip-skip", "9"]) == 2
    assert "clip skip 9: must be from 1 to 5" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()
