"""The trainer's options: one dataclass from flags, TOML or YAML, checked the same way whatever the source."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from studio.errors import StudioError
from studio.train_config import TrainConfig, build_parser, parse_config

REQUIRED = ["--instance-dir", "imgs", "--instance-prompt", "a sks dog", "--output-dir", "out"]


def test_toml_and_yaml_files_give_the_same_config_as_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'instance_dir = "imgs"\ninstance-prompt = "a sks dog"\noutput_dir = "out"\n'
        'max_train_steps = 50\nlearning-rate = 1e-4\nunet_targets = ["to_k", "to_q"]\ntrain_text_encoder = true\n'
    )
    yaml = tmp_path / "run.yaml"
    yaml.write_text(
        "instance_dir: imgs\ninstance-prompt: a sks dog\noutput_dir: out\n"
        "max_train_steps: 50\nlearning-rate: 1e-4\nunet_targets: to_k,to_q\ntrain_text_encoder: true\n"
    )  # YAML reads 1e-4 as a string: it is still a learning rate
    flags = REQUIRED + ["--max-train-steps", "50", "--learning_rate", "1e-4", "--unet-targets", "to_k,to_q",
                        "--train-text-encoder"]  # fmt: skip
    from_toml, from_yaml, from_flags = (
        parse_config(["--config", str(toml)]),
        parse_config(["--config", str(yaml)]),
        parse_config(flags),
    )
    assert from_toml == from_yaml == from_flags
    assert from_flags.learning_rate == 1e-4 and from_flags.unet_targets == ["to_k", "to_q"]


def test_flags_override_the_config_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('instance_dir = "imgs"\ninstance_prompt = "x"\noutput_dir = "out"\nrank = 8\nrandom_flip = true\n')
    config = parse_config(["--config", str(toml), "--rank", "16", "--no-random-flip"])
    assert config.rank == 16 and config.alpha == 16.0 and config.random_flip is False


def test_dash_and_underscore_flags_are_the_same_option():
    dashes = parse_config(
        REQUIRED + ["--train-batch-size", "3", "--gradient-accumulation-steps", "2", "--snr-gamma", "5"]
    )
    underscores = parse_config(
        ["--instance_dir", "imgs", "--instance_prompt", "a sks dog", "--output_dir", "out",
         "--train_batch_size", "3", "--gradient_accumulation_steps", "2", "--snr_gamma", "5"]
    )  # fmt: skip
    assert dashes == underscores
    assert (dashes.train_batch_size, dashes.gradient_accumulation_steps, dashes.snr_gamma) == (3, 2, 5.0)


def test_defaults_alpha_equals_rank_and_trigger_is_the_instance_prompt():
    config = parse_config(REQUIRED + ["--rank", "8"])
    assert config.alpha == 8.0
    assert config.trigger_words == "a sks dog"
    assert config.unet_targets == ["to_k"]
    assert config.text_encoder_targets == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert config.crop == "center" and not config.random_flip and config.cache_latents


def test_diffusers_center_crop_flag_is_accepted():
    assert parse_config(REQUIRED + ["--crop", "random", "--center_crop"]).crop == "center"


def test_diffusers_and_kohya_names_of_the_same_options_are_accepted():
    diffusers_command = parse_config(
        ["--pretrained_model_name_or_path=tiny-sd", "--instance_data_dir=imgs", "--output_dir=out",
         "--instance_prompt=a sks dog", "--with_prior_preservation", "--class_data_dir=cls",
         "--class_prompt=a dog", "--use_8bit_adam"]
    )  # fmt: skip
    assert (diffusers_command.base, str(diffusers_command.instance_dir), str(diffusers_command.class_dir)) == (
        "tiny-sd", "imgs", "cls"
    )
    assert diffusers_command.optimizer == "adamw8bit"
    kohya_command = parse_config(
        REQUIRED + ["--network_dim", "16", "--network_alpha", "8", "--network_dropout", "0.1",
                    "--min_snr_gamma", "5", "--flip_aug", "--save_every_n_steps", "50", "--enable_bucket"]
    )  # fmt: skip
    assert (kohya_command.rank, kohya_command.alpha, kohya_command.dropout, kohya_command.snr_gamma) == (16, 8, 0.1, 5)
    assert (kohya_command.random_flip, kohya_command.checkpointing_steps, kohya_command.buckets) == (True, 50, "auto")


def test_config_file_switches_of_other_scripts_set_their_option(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('instance_dir = "imgs"\ninstance_prompt = "x"\noutput_dir = "out"\n'
                    "use_8bit_adam = true\nenable_bucket = true\n")  # fmt: skip
    config = parse_config(["--config", str(toml)])
    assert (config.optimizer, config.buckets) == ("adamw8bit", "auto")
    toml.write_text('instance_dir = "imgs"\ninstance_prompt = "x"\noutput_dir = "out"\ncrop = "random"\n'
                    "center_crop = true\n")  # fmt: skip
    with pytest.raises(StudioError, match="center_crop is given twice"):
        parse_config(["--config", str(toml)])
    toml.write_text('instance_dir = "imgs"\ninstance_prompt = "x"\noutput_dir = "out"\nuse_8bit_adam = false\n')
    assert parse_config(["--config", str(toml)]).optimizer == "adamw"


def test_config_file_keys_may_use_the_other_names_but_not_twice(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('pretrained_model_name_or_path = "tiny-sd"\ninstance_data_dir = "imgs"\n'
                    'instance_prompt = "x"\noutput_dir = "out"\nnetwork_dim = 8\n')  # fmt: skip
    config = parse_config(["--config", str(toml)])
    assert (config.base, str(config.instance_dir), config.rank) == ("tiny-sd", "imgs", 8)
    toml.write_text('instance_dir = "imgs"\ninstance_prompt = "x"\noutput_dir = "out"\nrank = 4\nnetwork-dim = 8\n')
    with pytest.raises(StudioError, match=r"run.toml: network-dim is given twice"):
        parse_config(["--config", str(toml)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "0", "--push_to_hub"], r"^--push-to-hub: this trainer does not upload"),
        (["--xformers"], r"^--xformers: not needed: PyTorch's scaled-dot-product attention is used$"),
        (["--sdpa"], r"^--sdpa: not needed: PyTorch's scaled-dot-product attention is used$"),
        (["--save_model_as=safetensors"], r"^--save-model-as: not needed: LoRA files are always safetensors$"),
        (["--v2", "--v_parameterization"], r"^--v2: not needed: SD2 and v-prediction are read from the base"),
        (["--reg_data_dir", "reg"], r"^--reg-data-dir: use --with-prior-preservation with --class-dir"),
        (["--unet_lr", "1e-4"], r"^--unet-lr: use --learning-rate \(the UNet's rate here"),
        (["--frobnicate", "3"], r"^unknown option\(s\) --frobnicate 3 \(see --help\)$"),
    ],
)
def test_flags_of_other_scripts_without_an_equivalent_say_what_to_use(flags, message):
    with pytest.raises(StudioError, match=message):
        parse_config(REQUIRED + flags)


def test_a_pasted_command_learns_every_flag_to_change_in_one_line():
    kohya = ["--network_module=networks.lora", "--xformers", "--unet_lr", "1e-4", "--save_model_as=safetensors",
             "--network_dim=8", "--frobnicate", "3"]  # fmt: skip
    with pytest.raises(StudioError) as raised:
        parse_config(REQUIRED + kohya)
    message = str(raised.value)
    assert "\n" not in message
    assert [part.split(":")[0] for part in message.split("; ")] == [
        "--network-module", "--xformers", "--unet-lr", "--save-model-as",
        "unknown option(s) --frobnicate 3 (see --help)",
    ]  # fmt: skip


def test_config_file_keys_of_other_scripts_get_the_same_hint(tmp_path):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("instance_dir: imgs\ninstance_prompt: x\noutput_dir: out\nhub_model_id: me/lora\n")
    with pytest.raises(StudioError, match=r"run.yaml: hub_model_id: this trainer does not upload"):
        parse_config(["--config", str(yaml)])


def test_lengths_are_given_in_steps_or_in_epochs_not_both(tmp_path):
    neither = parse_config(REQUIRED)  # the trainer's defaults apply (tests/test_train_dreambooth.py: plan_steps)
    assert neither.max_train_steps is neither.checkpointing_steps is neither.validation_steps is None
    assert neither.num_train_epochs is neither.checkpointing_epochs is neither.validation_epochs is None
    assert replace(neither, num_train_epochs=3).num_train_epochs == 3  # a default does not count as given
    epochs = parse_config(REQUIRED + ["--num_train_epochs", "10", "--save_every_n_epochs", "2", "--validation-epochs",
                                      "5"])  # fmt: skip
    assert (epochs.num_train_epochs, epochs.checkpointing_epochs, epochs.validation_epochs) == (10, 2, 5)
    assert epochs.max_train_steps is epochs.checkpointing_steps is epochs.validation_steps is None
    assert parse_config(REQUIRED + ["--max_train_epochs", "3"]).num_train_epochs == 3  # kohya's name
    with pytest.raises(StudioError, match=r"^--max-train-steps and --num-train-epochs: give one of the two$"):
        parse_config(REQUIRED + ["--max-train-steps", "50", "--num-train-epochs", "2"])
    with pytest.raises(StudioError, match=r"^--validation-epochs 0: must be at least 1$"):
        parse_config(REQUIRED + ["--validation-epochs", "0"])

    # A length typed on the command line replaces the config file's, whichever unit either uses.
    toml = tmp_path / "run.toml"
    toml.write_text('instance_dir = "imgs"\ninstance_prompt = "x"\noutput_dir = "out"\nmax_train_steps = 50\n'
                    'checkpointing_epochs = 2\n')  # fmt: skip
    config = parse_config(["--config", str(toml), "--num-train-epochs", "4", "--checkpointing-steps", "7"])
    assert (config.max_train_steps, config.num_train_epochs) == (None, 4)
    assert (config.checkpointing_steps, config.checkpointing_epochs) == (7, None)
    toml.write_text('instance_dir = "imgs"\ninstance_prompt = "x"\noutput_dir = "out"\nmax_train_steps = 50\n'
                    'num_train_epochs = 2\n')  # fmt: skip
    with pytest.raises(StudioError, match=r"--max-train-steps and --num-train-epochs: give one of the two"):
        parse_config(["--config", str(toml)])


def test_help_documents_every_option():
    text = build_parser().format_help()
    for option in fields(TrainConfig):
        assert f"--{option.name.replace('_', '-')}" in text


def test_help_names_each_spelling_once_and_switches_bare():
    text = " ".join(build_parser().format_help().split())  # undo the line wrapping
    assert "--max-train-steps, --max_train_steps MAX_TRAIN_STEPS " in text
    assert "--dora, --no-dora, --use-dora," in text
    assert "[true|false]" not in text and "=true or =false" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('instance_dir = "a"\nlearning_rat = 1e-4\n', "unknown option(s) learning_rat"),
        ('rank = "big"\n', "rank = 'big' should be an integer"),
        ("rank = [\n", "not valid TOML"),
        ("caption_extension = 5\n", "caption_extension = 5 should be text"),
        ("unet_targets = [1, 2]\n", "unet_targets = [1, 2] should be a list of names"),
        ('use_8bit_adam = "yes"\n', "use_8bit_adam = 'yes' should be true or false"),
    ],
)
def test_bad_config_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(StudioError, match="bad.toml") as error:
        parse_config(["--config", str(path)] + REQUIRED)
    assert message in str(error.value)


def test_config_files_in_utf8_with_a_byte_order_mark_are_read_and_others_named(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes("\ufeffinstance_prompt = 'un café'\n".encode("utf-8"))  # as Windows Notepad saves it
    assert parse_config(["--config", str(path), "--instance-dir", "imgs", "--output-dir", "o"]).instance_prompt == "un café"
    path.write_bytes("instance_prompt = 'un café'\n".encode("latin-1"))
    with pytest.raises(StudioError, match=r"run.toml: the config file is not UTF-8 text"):
        parse_config(["--config", str(path)] + REQUIRED)


def test_a_null_in_yaml_names_the_option(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: null\nvalidation_prompt: null\n")  # the second may be unset: it is optional
    with pytest.raises(StudioError, match=r"run.yaml: learning_rate has no value \(null\); give one, or leave"):
        parse_config(["--config", str(path)] + REQUIRED)
    path.write_text("validation_prompt: null\n")
    assert parse_config(["--config", str(path)] + REQUIRED).validation_prompt is None


def test_missing_required_options_are_named():
    with pytest.raises(StudioError, match="--instance-dir, --output-dir"):
        parse_config(["--instance-prompt", "x"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resolution": 100}, "multiple of 8"),
        ({"rank": -1}, "--rank -1"),
        ({"unet_targets": "to_k,attn"}, "unknown module name(s) attn"),
        ({"buckets": "64x64"}, "height,width"),
        ({"buckets": "60,64"}, "multiples of 8"),
        ({"dora": True, "init": "pissa"}, "--dora cannot"),
        ({"loraplus_lr_ratio": 0.5}, "at least 1"),
        ({"ema_decay": 1.0}, "--ema-decay 1.0"),
        ({"min_timestep": 600, "max_timestep": 600}, "need 0 <= min < max"),
        ({"min_timestep": -1}, "--min-timestep -1"),
        ({"with_prior_preservation": True}, "--class-prompt"),
        ({"optimizer": "sgd"}, "adamw"),
    ],
)
def test_values_are_checked_in_post_init(overrides, message):
    with pytest.raises(StudioError) as error:
        TrainConfig(instance_dir="i", instance_prompt="p", output_dir="o", **overrides)
    assert message in str(error.value)


def test_a_longer_module_suffix_narrows_the_targets():
    config = TrainConfig(instance_dir="i", instance_prompt="p", output_dir="o", unet_targets="attn2.to_k,attn2.to_v")
    assert config.unet_targets == ["attn2.to_k", "attn2.to_v"]  # cross-attention only, as peft matches suffixes
    with pytest.raises(StudioError, match="attn2.to_z"):
        TrainConfig(instance_dir="i", instance_prompt="p", output_dir="o", unet_targets="attn2.to_z")


def test_run_identity_ignores_how_a_run_is_watched_but_not_what_it_learns():
    one = TrainConfig(instance_dir="i", instance_prompt="p", output_dir="o")
    watched = TrainConfig(
        instance_dir="i", instance_prompt="p", output_dir="o2", max_train_steps=900, validation_prompt="v"
    )
    learns = TrainConfig(instance_dir="i", instance_prompt="p", output_dir="o", learning_rate=1e-3)
    assert one.run_identity() == watched.run_identity()
    assert one.run_identity() != learns.run_identity()


def test_caption_extension_gets_its_dot_and_cannot_name_images():
    assert parse_config(REQUIRED + ["--caption-extension", "caption"]).caption_extension == ".caption"
    with pytest.raises(StudioError, match=r"--caption-extension '.PNG': a text file's extension"):
        parse_config(REQUIRED + ["--caption-extension", ".PNG"])
    with pytest.raises(StudioError, match=r"--keep-tokens -1: must be at least 0"):
        parse_config(REQUIRED + ["--keep-tokens", "-1"])


def test_kohya_and_diffusers_names_for_the_same_options():
    config = parse_config(REQUIRED + [
        "--optimizer_type", "AdamW8bit", "--lr_scheduler_num_cycles", "3", "--lr_scheduler_power", "2",
        "--max_data_loader_n_workers", "2", "--caption_extention", ".caption", "--dataset_repeats", "5",
        "--resume", "latest", "--log_with", "tensorboard", "--sample_every_n_steps", "50", "--random_crop",
        "--train-text-encoder", "--network_train_unet_only", "--lora_dropout", "0.1", "--use_dora",
        "--output_name", "mylora.safetensors", "--adam_weight_decay_text_encoder", "1e-3",
    ])  # fmt: skip
    assert config.optimizer == "adamw8bit"
    assert (config.lr_num_cycles, config.lr_power, config.dataloader_num_workers) == (3, 2.0, 2)
    assert (config.caption_extension, config.repeats, config.resume_from_checkpoint) == (".caption", 5, "latest")
    assert (config.report_to, config.validation_steps, config.crop) == ("tensorboard", 50, "random")
    assert config.train_text_encoder is False and config.dropout == 0.1 and config.dora is True
    assert config.output_name == "mylora" and config.export_kohya is True  # naming the kohya copy asks for it
    assert parse_config(REQUIRED + ["--output-name", "Mine.SafeTensors"]).output_name == "Mine"
    assert parse_config(REQUIRED).export_kohya is False
    with pytest.raises(StudioError, match=r"^--output-name names the kohya copy: it cannot go with --no-export-kohya$"):
        parse_config(REQUIRED + ["--output-name", "mine", "--no-export-kohya"])
    assert config.adam_weight_decay_text_encoder == 1e-3
    assert parse_config(REQUIRED + ["--output_kohya_format"]).export_kohya is True


def test_optimizer_names_in_any_case_and_prodigy_trains_the_text_encoder_at_its_rate():
    assert parse_config(REQUIRED).text_encoder_lr == 5e-6
    prodigy = parse_config(REQUIRED + ["--optimizer", "Prodigy", "--learning-rate", "1.0"])
    assert prodigy.optimizer == "prodigy" and prodigy.text_encoder_lr == 1.0  # a multiplier of its own estimate
    assert parse_config(REQUIRED + ["--optimizer", "prodigy", "--text-encoder-lr", "0.5"]).text_encoder_lr == 0.5
    with pytest.raises(StudioError, match=r"^--optimizer 'lion': use one of adamw, adamw8bit, prodigy$"):
        parse_config(REQUIRED + ["--optimizer_type", "Lion"])


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "pytorch_lora_weights", " "])
def test_output_name_is_a_plain_file_name(name):
    with pytest.raises(StudioError, match=r"^--output-name .*: a plain file name, other than the diffusers file's$"):
        parse_config(REQUIRED + ["--output-name", name])


def test_validation_comes_from_one_prompt_or_a_prompt_file_not_both(tmp_path):
    config = parse_config(REQUIRED + ["--sample_prompts", "prompts.txt"])  # kohya's name
    assert str(config.validation_prompts_file) == "prompts.txt" and config.validation_prompt is None
    with pytest.raises(StudioError, match=r"^--validation-prompt and --validation-prompts-file: give one of the two$"):
        parse_config(REQUIRED + ["--validation-prompt", "a dog", "--validation-prompts-file", "prompts.txt"])
    toml = tmp_path / "run.toml"
    toml.write_text('instance_dir = "imgs"\noutput_dir = "out"\nvalidation_prompt = "a dog"\n')
    config = parse_config(["--config", str(toml), "--sample_prompts", "prompts.txt"])  # the flag replaces the file's
    assert (config.validation_prompt, str(config.validation_prompts_file)) == (None, "prompts.txt")


def test_switches_also_take_true_or_false_as_diffusers_docs_write_them():
    config = parse_config(REQUIRED + ["--prodigy_safeguard_warmup=False", "--prodigy_use_bias_correction", "false",
                                      "--train_text_encoder=True", "--no-prodigy-decouple", "--rank", "8"])  # fmt: skip
    assert (config.prodigy_safeguard_warmup, config.prodigy_use_bias_correction) == (False, False)
    assert (config.train_text_encoder, config.prodigy_decouple, config.rank) == (True, False, 8)
    with pytest.raises(StudioError, match=r"^argument --dora: expected true or false, not 'maybe' \(see --help\)$"):
        parse_config(REQUIRED + ["--dora=maybe"])


def test_a_square_resolution_may_be_written_as_kohya_writes_it(tmp_path):
    assert parse_config(REQUIRED + ["--resolution=1024,1024"]).resolution == 1024
    assert parse_config(REQUIRED + ["--resolution", "512"]).resolution == 512
    with pytest.raises(StudioError, match=r"^argument --resolution: 768,512 is not square: give one size .*--buckets"):
        parse_config(REQUIRED + ["--resolution", "768,512"])
    toml = tmp_path / "run.toml"
    toml.write_text('instance_dir = "imgs"\noutput_dir = "out"\nresolution = "640,640"\n')
    assert parse_config(["--config", str(toml)]).resolution == 640
    toml.write_text('instance_dir = "imgs"\noutput_dir = "out"\nresolution = "640,480"\n')
    with pytest.raises(StudioError, match=r"run.toml: resolution = '640,480': 640,480 is not square"):
        parse_config(["--config", str(toml)])


def test_conv_rank_keeps_the_scale_of_alpha_unless_told_and_needs_no_file_to_start_from():
    config = parse_config(REQUIRED + ["--network_dim", "8", "--network_alpha", "4", "--conv_dim", "16"])
    assert (config.conv_rank, config.conv_alpha) == (16, 8.0)  # 4/8 = 8/16
    assert parse_config(REQUIRED + ["--conv-rank", "4", "--conv_alpha", "1"]).conv_alpha == 1.0
    assert parse_config(REQUIRED).conv_rank is parse_config(REQUIRED).conv_alpha is None
    with pytest.raises(StudioError, match=r"^--conv-alpha goes with --conv-rank$"):
        parse_config(REQUIRED + ["--conv-alpha", "1"])
    with pytest.raises(StudioError, match=r"^--init-from cannot be combined with --conv-rank"):
        parse_config(REQUIRED + ["--conv-rank", "4", "--init-from", "a.safetensors"])


def test_kohyas_network_args_set_the_conv_rank_on_the_command_line_and_in_a_file(tmp_path):
    config = parse_config(REQUIRED + ["--network_args", "conv_dim=8", "conv_alpha=4"])
    assert (config.conv_rank, config.conv_alpha) == (8, 4.0)
    with pytest.raises(StudioError, match=r"^--network-args: 'algo=locon' has no equivalent here; conv_dim=N"):
        parse_config(REQUIRED + ["--network_args", "conv_dim=8", "algo=locon"])
    with pytest.raises(StudioError, match=r"^--network-args and --conv-rank both set conv_rank: give one$"):
        parse_config(REQUIRED + ["--network_args", "conv_dim=8", "--conv-rank", "4"])
    toml = tmp_path / "run.toml"
    toml.write_text('instance_dir = "imgs"\noutput_dir = "out"\nnetwork_args = ["conv_dim=16", "conv_alpha=2"]\n')
    assert (parse_config(["--config", str(toml)]).conv_rank, parse_config(["--config", str(toml)]).conv_alpha) == (
        16, 2.0
    )  # fmt: skip
    toml.write_text('instance_dir = "imgs"\noutput_dir = "out"\nconv_dim = 4\nnetwork_args = ["conv_dim=16"]\n')
    with pytest.raises(StudioError, match=r"run.toml: conv_rank is given twice \(once in network_args\)$"):
        parse_config(["--config", str(toml)])
