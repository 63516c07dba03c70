"""Config loading: YAML + dotted overrides, strict keys and types."""

import pytest

from megatron_ecdit.config import Config, ConfigError, load_config, paper_model


def test_defaults_validate_and_overrides_apply(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 96\noptim:\n  lr: 3e-4\n")
    cfg = load_config(path, ["moe.num_experts=4", "train.steps=7", "moe.layers=[0, 2]"])
    assert cfg.model.hidden_size == 96
    assert cfg.optim.lr == 3e-4
    assert cfg.moe.num_experts == 4 and cfg.train.steps == 7
    assert cfg.moe.moe_layer_indices(cfg.model.num_layers) == [0, 2]


def test_unknown_key_names_it_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'model.hiden_size'.*hidden_size"):
        load_config(overrides=["model.hiden_size=3"])
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'train.steps' expects int"):
        load_config(overrides=["train.steps=many"])
    with pytest.raises(ConfigError, match="'optim.name' must be one of"):
        load_config(overrides=["optim.name=sgd"])
    with pytest.raises(ConfigError, match="'train.precision'"):
        load_config(overrides=["train.precision=fp8"])


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")


def test_malformed_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="override 'train.sample_prompts'.*not valid YAML"):
        load_config(overrides=["train.sample_prompts=['a red"])
    path = tmp_path / "broken.yaml"
    path.write_text("train: [steps: 3\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(path)


def test_paper_sizes():
    model, moe = paper_model("M", 64)
    assert (model.num_layers, model.hidden_size, model.num_kv_heads) == (38, 3072, 12)
    assert model.head_dim == 64 and model.num_patches == 256
    assert paper_model("M", 0)[0].num_layers == 46
    with pytest.raises(ConfigError, match="unknown model size"):
        paper_model("XS", 8)


def test_pixel_space_checks_the_patch_size_against_the_image_size():
    load_config(overrides=["data.image_size=24", "model.patch_size=3"])  # 32 % 3 is no error
    with pytest.raises(ConfigError, match="model.input_size=24 is not divisible by "
                                          "model.patch_size=5"):
        load_config(overrides=["data.image_size=24", "model.patch_size=5"])


def test_a_config_saved_by_an_earlier_version_loads():
    saved = Config().to_dict()
    saved["parallel"]["overlap_param_gather"] = False  # a key since removed
    saved["parallel"]["activation_checkpointing"] = True  # once a switch
    cfg = load_config(base=saved)
    assert cfg.parallel.activation_checkpointing == "full"
    with pytest.raises(ConfigError, match="overlap_param_gather"):  # not in new configs
        load_config(overrides=["parallel.overlap_param_gather=true"])
