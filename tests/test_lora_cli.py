"""`python -m studio.lora`: inspect prints a readable report or JSON, convert rewrites names without
changing any delta, and every user error is one line on stderr with exit status 2."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_factories import kohya_lora, loha_lora

from studio.lora import main
from studio.lora_io import read_lora
from studio.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    sd1, sdxl = tiny_sd_pipeline(0), tiny_sdxl_pipeline(0)
    return {
        "kohya-sdxl": kohya_lora(sdxl, folder / "kohya-sdxl.safetensors", "sdxl", conv=True, distinct=True),
        "loha-sd1": loha_lora(sd1, folder / "loha-sd1.safetensors", "sd1", distinct=True),
    }


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_same_deltas(a, b):
    assert set(a.state_dict) == set(b.state_dict)
    for key in a.state_dict:
        if key.endswith("lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            product = [
                lora.state_dict[f"{module}.lora_B.weight"].flatten(1).double()
                @ lora.state_dict[key].flatten(1).double()
                for lora in (a, b)
            ]
            torch.testing.assert_close(product[0], product[1], msg=module)


def test_inspect_prints_a_readable_report(capsys, files):
    lora_file = files["kohya-sdxl"]
    status, out, err = run(capsys, "inspect", lora_file.path)
    data = lora_file.path.read_bytes()
    tensor_data = data[8 + int.from_bytes(data[:8], "little") :]
    assert (status, err) == (0, "")
    assert "format:        locon (kohya naming)" in out
    assert "family:        sdxl" in out
    assert "components:    unet (" in out and "text_encoder_2 (" in out
    assert f"rank:          {', '.join(map(str, sorted(lora_file.ranks)))}" in out
    assert f"sha256:        {hashlib.sha256(data).hexdigest()}" in out
    assert f"a1111 hash:    {hashlib.sha256(tensor_data).hexdigest()[:12]}" in out
    assert "trigger words: sks shape, striped, purple star" in out
    assert "  ss_network_module: networks.lora" in out


def test_inspect_json_has_the_whole_report(capsys, files):
    lora_file = files["loha-sd1"]
    status, out, _ = run(capsys, "inspect", lora_file.path, "--json")
    report = json.loads(out)
    assert status == 0
    assert (report["format"], report["naming"], report["family"]) == ("loha", "kohya", "sd1")
    assert report["num_modules"] == len(report["modules"]) == len(lora_file.deltas)
    assert set(report["ranks"]) == lora_file.ranks
    assert report["size_bytes"] == lora_file.path.stat().st_size
    assert report["sha256"] == hashlib.sha256(lora_file.path.read_bytes()).hexdigest()


@pytest.mark.parametrize("naming", ["diffusers", "kohya"])
def test_convert_rewrites_names_and_keeps_every_delta(capsys, files, tmp_path, naming):
    source = files["kohya-sdxl"]
    out_path = tmp_path / f"to-{naming}.safetensors"
    status, out, err = run(capsys, "convert", source.path, out_path, "--to", naming)
    assert (status, err) == (0, "")
    assert str(out_path) in out
    converted = read_lora(out_path)
    assert (converted.naming, converted.family) == (naming, "sdxl")
    assert converted.metadata["studio.converted_from"] == "locon (kohya naming)"
    assert_same_deltas(read_lora(source.path), converted)


def test_convert_turns_loha_into_plain_lora_factors(capsys, files, tmp_path):
    out_path = tmp_path / "loha-as-lora.safetensors"
    assert run(capsys, "convert", files["loha-sd1"].path, out_path, "--to", "kohya")[0] == 0
    converted = read_lora(out_path)
    assert converted.format == "kohya"
    assert_same_deltas(read_lora(files["loha-sd1"].path), converted)


def assert_one_line_failure(capsys, *argv, mentions):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and mentions in err


def test_bad_file_is_one_line_and_exit_2(capsys, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_text("not weights")
    assert_one_line_failure(capsys, "inspect", path, mentions=str(path))


def test_missing_file_is_one_line_and_exit_2(capsys, tmp_path):
    assert_one_line_failure(capsys, "inspect", tmp_path / "missing.safetensors", mentions="no such file")


def test_pickle_needs_allow_pickle(capsys, files, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "old.pt"
    torch.save(load_file(files["loha-sd1"].path), path)
    assert_one_line_failure(capsys, "inspect", path, mentions="--allow-pickle")
    status, out, _ = run(capsys, "inspect", path, "--allow-pickle")
    assert status == 0 and "format:        loha" in out


def test_convert_refuses_to_write_anything_but_safetensors(capsys, files, tmp_path):
    assert_one_line_failure(
        capsys, "convert", files["loha-sd1"].path, tmp_path / "x.ckpt", "--to", "kohya", mentions="safetensors only"
    )
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "a.safetensors", "b.safetensors", "--to", "ckpt"])
    assert exit_info.value.code == 2


def test_module_runs_as_a_program(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 4)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-m", "studio.lora", "inspect", str(path)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: not a safetensors file (shorter than a safetensors header)"
    ]
