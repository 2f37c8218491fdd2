import pytest
from conftest import EXAMPLES, cli

from tuneforge.config import load_config
from tuneforge.errors import ConfigError


@pytest.mark.parametrize("name", ["quickstart", "tiny", "llama3-8b-qlora", "llama-1b-full", "llama3-8b-multinode"])
def test_example_configs_validate(name):
    config = load_config(EXAMPLES / f"{name}.yaml")
    assert config.data.sources[0].path.startswith(str(EXAMPLES))  # relative to the config file


def test_wrong_type_names_key_value_and_expectation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text((EXAMPLES / "tiny.yaml").read_text().replace("max_steps: 30", "max_steps: many"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "sft.max_steps" in message and "'many'" in message and "integer" in message


def test_unknown_and_missing_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nbase_model: {source: tiny-llama, typo_key: 1}\n")
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert "base_model.typo_key: unknown key" in message
    assert "data: required key is missing" in message


def test_literal_choices_are_listed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(EXAMPLES / "tiny.yaml", ["sft.method=lorra"])
    assert "sft.method" in str(err.value) and "'lorra'" in str(err.value) and "'qlora'" in str(err.value)


def test_set_overrides_keep_types():
    config = load_config(EXAMPLES / "tiny.yaml", ["sft.learning_rate=1e-4", "sft.lora.target_modules=[q_proj,v_proj]", "dpo.enabled=false"])
    assert config.sft.learning_rate == 1e-4
    assert config.sft.lora.target_modules == ["q_proj", "v_proj"]
    assert config.dpo.enabled is False


def test_bad_set_syntax_and_bad_yaml(tmp_path):
    assert "expected KEY=VALUE" in str(pytest.raises(ConfigError, load_config, EXAMPLES / "tiny.yaml", ["sft.lr"]).value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert "not valid YAML" in str(pytest.raises(ConfigError, load_config, bad).value)
    assert "config file not found" in str(pytest.raises(ConfigError, load_config, tmp_path / "none.yaml").value)


def test_cli_validate_exit_codes(tmp_path):
    ok = cli("validate", EXAMPLES / "tiny.yaml", "--set", "sft.max_steps=3")
    assert ok.exit_code == 0 and "max_steps: 3" in ok.stdout
    bad = cli("validate", EXAMPLES / "tiny.yaml", "--set", "sft.batch_size=0")
    assert bad.exit_code == 2 and "sft.batch_size" in bad.stderr and "greater than 0" in bad.stderr


def test_config_schema_documents_keys():
    result = cli("config-schema")
    assert result.exit_code == 0 and "trust_remote_code" in result.stdout and "Run model code shipped" in result.stdout


def test_values_outside_the_guides_table_are_warned_about_not_refused(tmp_path):
    from tuneforge.advice import hyperparameter_warnings

    config = load_config(EXAMPLES / "llama3-8b-qlora.yaml", ["sft.learning_rate=1e-3", "sft.lora.r=4", "sft.lora.alpha=64",
                                                              "sft.warmup_ratio=0.5", "dpo.beta=2", "sft.grad_accum=100"])
    warnings = hyperparameter_warnings(config)
    assert "sft.learning_rate is 0.001, outside the guide's range for qlora fine-tuning (1e-05 to 0.0003)" in warnings
    assert "sft.lora.r is 4, outside the guide's range for the LoRA rank (8 to 128)" in warnings
    assert "sft.lora.alpha is 64, outside the guide's range for the LoRA alpha (r to 2r) (4 to 8)" in warnings
    assert "sft.warmup_ratio is 0.5, outside the guide's range for warm-up (share of the steps) (0.03 to 0.1)" in warnings
    assert "dpo.beta is 2, outside the guide's range for DPO's beta (0.01 to 0.5)" in warnings
    assert "sft.batch_size x grad_accum x processes is 800, outside the guide's range for the effective batch (8 to 128)" in warnings
    result = cli("validate", EXAMPLES / "llama3-8b-qlora.yaml", "--set", "dpo.beta=2")
    assert result.exit_code == 0 and "warning: dpo.beta is 2" in result.stderr


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_in_the_guides_ranges_or_say_why_not(example):
    from tuneforge.advice import hyperparameter_warnings

    text = (EXAMPLES / example).read_text()
    for warning in hyperparameter_warnings(load_config(EXAMPLES / example)):
        section, key = warning.split(" ", 1)[0].split(".")[:2]
        key = key.split()[0]
        # The key's line in the example carries a comment that says why it is outside the guide's range.
        lines = [line for line in text.splitlines() if line.strip().startswith(f"{key}:") and "guide" in line]
        assert lines, f"{example}: {warning}, and no comment says why"
